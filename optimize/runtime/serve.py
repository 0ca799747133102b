"""`python -m runtime ART serve`: the artifact behind an OpenAI-compatible HTTP API, on Starlette
and uvicorn (`pip install -r runtime/requirements-serve.txt`; `embed` and `generate` need none of it).

    GET  /health               {"status": "ok"}
    GET  /v1/models            the one model this server runs
    POST /v1/embeddings        encoders: requests gathered into batches (dynamic batching)
    POST /v1/completions       decoders: a prompt continued; `stream: true` sends server-sent events
    POST /v1/chat/completions  decoders: messages rendered in the model's chat template
    GET  /metrics              Prometheus text: requests, queue depth, batch sizes, latency, tokens

The model runs on one worker thread, never on the event loop. Embedding requests run as one batch
with what is queued when the model is free, and with requests already admitted that arrive within
`Limits.batch_wait_ms` (up to `batch_tokens` tokens; a lone request does not wait), sorted by
length so padding is short, and the rows go back to their requests in order. Generation requests
are batched by OpenVINO GenAI's continuous batching where the artifact has `openvino-genai/` and
the package is installed (each step advances every open request a token; new prompts join the next
step), or else interleaved a token at a time on that thread (every client streams while the others
do; llama.cpp, which keeps one sequence, serves them one after another); `--engine` chooses. A
client that goes away is dropped at its next token. Past `max_queue` waiting requests the answer is
429 with Retry-After; longer than the model takes, 400; a body over `max_body` bytes, 413; over
`timeout_s`, 504. Unknown request fields are ignored, wrong ones are a 400 with an OpenAI-style
error object; with an API key, a request without `Authorization: Bearer KEY` is a 401.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from starlette.types import Receive, Scope, Send

from .decoding import Sampling, Text
from .engines import BATCHING, OWN_LOOP, SEQUENTIAL
from .serve_worker import ApiError, Job, Limits, Metrics, Worker
from .untyped import Json

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse

    from . import OnnxModel


class Server:
    """The routes over one loaded artifact (`runtime.load`)."""

    def __init__(self, model: OnnxModel, name: str, limits: Limits, api_key: str | None, engine: str = "auto"):
        from .text import Tokenizer

        self.model, self.name, self.limits, self.api_key = model, name, limits, api_key
        self.metrics = Metrics()
        found = model.generators()
        self.decoder = bool(found)
        # auto: OpenVINO GenAI where it is installed, as it batches concurrent streams (one pass over
        # the weights for all of them; its prefill is also the fastest measured here); otherwise the
        # engine the recipe measured fastest, its streams interleaved a token at a time.
        if engine == "auto" and found:
            engine = BATCHING if BATCHING in found else found[0]
        self.engine = model.generator(engine) if self.decoder or engine != "auto" else "auto"
        batcher = model.continuous_batching() if self.engine == BATCHING else None
        if self.decoder and batcher is None and self.engine != OWN_LOOP:
            model.engine(self.engine)  # loaded now: a folder its engine cannot read stops the start, not a request
        # llama.cpp keeps one sequence per context: two streams interleaved on it would read each
        # other's cache (measured: the first's answer changed); its streams take turns whole
        self.worker = Worker(model, limits, self.metrics, batcher, interleave=self.engine not in SEQUENTIAL)
        self.seq_len = int(model.tokenizer.seq_len)
        # The model thread pads and truncates with the model's tokenizer; counting on the event loop
        # uses its own (a tokenizer's padding settings are state).
        self.counter = Tokenizer(model.folder / "tokenizer.json", self.seq_len)

    def app(self) -> Starlette:
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/embeddings", self.endpoint("embeddings", self.embeddings), methods=["POST"]),
            Route("/v1/completions", self.endpoint("completions", self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self.endpoint("chat", self.chat), methods=["POST"]),
        ]
        return Starlette(routes=routes)

    async def health(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok"})

    async def prometheus(self, request: Request) -> Response:
        from starlette.responses import Response

        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        self._authorize(request)
        return JSONResponse(
            {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "optimize"}]}
        )

    def endpoint(
        self, name: str, handler: Callable[[Json, Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """`handler` with what every POST route does: the key, the body, limits, errors, metrics."""

        from starlette.responses import StreamingResponse

        async def route(request: Request) -> Response:
            start, status = time.perf_counter(), 200
            try:
                self._authorize(request)
                body = await self._body(request)
                self.worker.admit()
                response = None
                try:
                    response = await asyncio.wait_for(handler(body, request), self.limits.timeout_s)
                finally:
                    if not isinstance(response, StreamingResponse):  # a stream gives its place back at its end
                        self.worker.release()
                return response
            except ApiError as exc:
                status = exc.status
                return exc.response()
            except asyncio.TimeoutError:
                status = 504
                return ApiError(504, f"the request took longer than {self.limits.timeout_s:g} s").response()
            finally:
                self.metrics.requests.labels(name, str(status)).inc()
                self.metrics.latency.labels(name).observe(time.perf_counter() - start)

        return route

    def _authorize(self, request: Request) -> None:
        if self.api_key and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY")

    async def _body(self, request: Request) -> Json:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body:
            raise ApiError(413, f"the body is over {self.limits.max_body} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.limits.max_body:
                raise ApiError(413, f"the body is over {self.limits.max_body} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body is not a JSON object")
        return body

    async def embeddings(self, body: Json, request: Request) -> Response:
        from starlette.responses import JSONResponse

        if self.decoder:
            raise ApiError(400, f"{self.name} generates text; it has no embeddings endpoint", "model")
        given = body.get("input")
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "input: a string or a non-empty list of strings", "input")
        counts = [len(self.counter.ids(t, special=True)) for t in texts]
        longest = max(counts)
        if longest > self.seq_len and body.get("truncate") is not True:  # `truncate: true`: cut to fit
            raise ApiError(
                400,
                f"input: {longest} tokens; the model takes at most {self.seq_len} (or send truncate: true)",
                "input",
            )
        counts = [min(c, self.seq_len) for c in counts]
        job = Job(asyncio.get_running_loop(), asyncio.Queue(), texts=texts)
        self.worker.inbox.put(job)
        rows = await job.out.get()
        if isinstance(rows, Exception):
            raise ApiError(500, f"the model failed: {rows}")
        self.metrics.tokens.labels("prompt").inc(sum(counts))
        assert isinstance(rows, np.ndarray)
        data = [{"object": "embedding", "index": i, "embedding": row.tolist()} for i, row in enumerate(rows)]
        usage = {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
        return JSONResponse({"object": "list", "data": data, "model": self.name, "usage": usage})

    async def completions(self, body: Json, request: Request) -> Response:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt: a string", "prompt")
        return await self._generate(self.model.prompt_ids(prompt), body, request, chat=False)

    async def chat(self, body: Json, request: Request) -> Response:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages: a non-empty list of {role, content}", "messages")
        turns = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "messages: each a {role, content} object", "messages")
            content = m.get("content")
            if isinstance(content, list):  # the parts form: its text parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise ApiError(400, "messages: content is a string", "messages")
            turns.append({"role": m["role"], "content": content})
        try:
            ids = self.model.prompt_ids(turns, chat=True)
        except ValueError as exc:
            raise ApiError(400, str(exc), "messages") from None
        return await self._generate(ids, body, request, chat=True)

    def _sampling(self, body: Json, chat: bool) -> Sampling:
        def number(key: str, default: float, kind: type[float] | type[int] = float) -> float:
            value = body.get(key, default)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
                raise ApiError(400, f"{key}: a number", key)
            return kind(value)

        most = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "stop: a string or a list of strings", "stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, "seed: an integer", "seed")
        try:
            return Sampling(
                max_new_tokens=min(
                    int(number(most, 16 if not chat else self.limits.max_new_tokens, int)), self.limits.max_new_tokens
                ),
                temperature=number("temperature", 1.0),
                top_k=int(number("top_k", 0, int)),
                top_p=number("top_p", 1.0),
                seed=seed,
                stop=tuple(stop),
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    async def _generate(self, ids: list[int], body: Json, request: Request, chat: bool) -> Response:
        from starlette.responses import JSONResponse

        if not self.decoder:
            raise ApiError(400, f"{self.name} is not a text generator; use /v1/embeddings", "model")
        sampling = self._sampling(body, chat)
        if len(ids) + sampling.max_new_tokens > self._context():
            raise ApiError(400, f"prompt: {len(ids)} tokens and max_tokens {sampling.max_new_tokens} exceed the "
                           f"model's context of {self._context()}", "prompt")  # fmt: skip
        job = Job(asyncio.get_running_loop(), asyncio.Queue())
        if self.worker.batcher is not None:
            job.prompt = (ids, sampling)
        else:
            job.tokens = self.model.tokens(ids, sampling, self.engine)
        self.worker.inbox.put(job)
        pieces = self._pieces(job, sampling, len(ids))
        kind = "chat.completion" if chat else "text_completion"
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.get("stream"):
            usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))
            events = self._events(pieces, kind, ident, created, chat, usage_wanted)
            return _stream(events, job, self.worker.release)
        text, finish, usage = [], "length", {}
        async for piece, reason, counted in pieces:
            text.append(piece)
            finish, usage = reason or finish, counted
        choice: Json = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return JSONResponse(
            {"id": ident, "object": kind, "created": created, "model": self.name, "choices": [choice], "usage": usage}
        )

    def _context(self) -> int:
        config = getattr(self.model, "config", {}) or {}
        return int(config.get("max_position_embeddings") or 1 << 30)

    async def _pieces(
        self, job: Job, sampling: Sampling, prompt_tokens: int
    ) -> AsyncIterator[tuple[str, str | None, dict[str, int]]]:
        """(new text, finish reason at the end, usage so far) as the model thread makes tokens."""
        text = Text(self.model.tokenizer.decode, sampling.stop)
        count = 0
        try:
            while True:
                token = await job.out.get()
                if isinstance(token, Exception):
                    raise ApiError(500, f"the model failed: {token}")
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                         "total_tokens": prompt_tokens + count}  # fmt: skip
                if token is None:  # the end of sequence
                    yield text.rest(), "stop", usage
                    return
                count += 1
                usage = {**usage, "completion_tokens": count, "total_tokens": prompt_tokens + count}
                piece, stopped = text.add(int(cast(int, token)))
                if stopped:
                    yield piece, "stop", usage
                    return
                if count >= sampling.max_new_tokens:
                    yield piece + text.rest(), "length", usage
                    return
                yield piece, None, usage
        finally:
            job.cancelled = True  # done, or the client left: the model thread drops it
            self.metrics.tokens.labels("prompt").inc(prompt_tokens)
            self.metrics.tokens.labels("completion").inc(count)

    async def _events(
        self,
        pieces: AsyncIterator[tuple[str, str | None, dict[str, int]]],
        kind: str,
        ident: str,
        created: int,
        chat: bool,
        usage_wanted: bool,
    ) -> AsyncIterator[bytes]:
        """Server-sent events: a chunk per piece of text, the finish reason, usage if asked, [DONE]."""
        chunk_kind = kind + ".chunk" if chat else kind

        def event(choices: list[Json], usage: dict[str, int] | None = None) -> bytes:
            body: Json = {"id": ident, "object": chunk_kind, "created": created, "model": self.name}
            body["choices"] = choices
            if usage_wanted:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n".encode()

        def choice(piece: str | None, reason: str | None) -> Json:
            if chat:
                delta = {} if piece is None else {"content": piece}
                return {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            return {"index": 0, "text": piece or "", "finish_reason": reason, "logprobs": None}

        if chat:
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        usage: dict[str, int] = {}
        try:
            async for piece, reason, counted in pieces:
                usage = counted
                if piece:
                    yield event([choice(piece, None)])
                if reason is not None:
                    yield event([choice(None if chat else "", reason)])
        except ApiError as exc:
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n".encode()
        if usage_wanted:
            yield event([], usage)
        yield b"data: [DONE]\n\n"


def _stream(events: AsyncIterator[bytes], job: Job, release: Callable[[], None]) -> StreamingResponse:
    """A server-sent event stream that holds a place in the queue until the response ends, however
    it ends: done, failed, or its client gone, even before the first event (when the event generator
    never starts, so its own `finally` would never run). Its job is dropped then too."""
    from starlette.responses import StreamingResponse

    class Stream(StreamingResponse):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                job.cancelled = True
                release()

    return Stream(events, media_type="text/event-stream")


def serve(
    artifact: Path, host: str, port: int, api_key: str | None, limits: Limits | None = None, engine: str = "auto"
) -> int:
    """Run the server until SIGINT or SIGTERM (uvicorn finishes in-flight requests, then exits)."""
    try:
        import uvicorn
    except ImportError:
        raise ValueError("serving needs its extra: pip install -r runtime/requirements-serve.txt") from None
    from . import load

    model = load(artifact)
    server = Server(model, Path(artifact).resolve().name, limits or Limits(), api_key, engine)
    uvicorn.run(server.app(), host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
    return 0
