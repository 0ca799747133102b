"""`python -m runtime ARTIFACT_DIR embed|classify|generate --input texts.jsonl`: JSONL on stdout.
`python -m runtime ARTIFACT_DIR serve [--host 127.0.0.1] [--port 8000] [--api-key KEY]`: an
OpenAI-compatible HTTP server (see serve.py; `pip install -r runtime/requirements-serve.txt`).

Input: JSONL with a "text" field per line, or plain text with one text per line ("-" for stdin).
Output, one line per text: {"text", "embedding"} (embed), {"text", "label", "score"} (classify) or
{"text", "generated"} (generate: the text is the prompt; greedy unless --temperature; --stream prints
the text as it comes instead). The provider used (and any that
could not be used) is reported on stderr. Exit 2 when the artifact or the input is unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import ArtifactError, OnnxModel, load
from .engines import GENERATING, OWN_LOOP


def _texts(source: str) -> list[str]:
    lines = (sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")).splitlines()
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError):
                raise ValueError(f'{source}:{number}: expected a JSON object with a "text" field') from None
        else:
            texts.append(line.strip())
    return texts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("artifact", type=Path, help="the artifact folder (holds manifest.json)")
    parser.add_argument(
        "command", choices=["embed", "classify", "generate", "serve"], help="what to compute, or serve (HTTP)"
    )
    parser.add_argument("--input", default="-", help="texts: .jsonl or .txt file, or - for stdin")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generate: tokens per prompt")
    parser.add_argument("--prompt", help="generate: this prompt instead of --input")
    parser.add_argument("--stream", action="store_true", help="generate: print text as it comes, no JSON")
    parser.add_argument("--temperature", type=float, default=0.0, help="generate: 0 is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="generate: sample among the k likeliest (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="generate: sample within this probability mass")
    parser.add_argument("--seed", type=int, help="generate: makes sampling repeatable")
    parser.add_argument("--stop", action="append", default=[], help="generate: end before this string (repeatable)")
    parser.add_argument("--chat", action="store_true", help="generate: the prompt as a user turn of the chat template")
    parser.add_argument(
        "--speculate",
        action="store_true",
        help="generate: check prompt-lookup drafts several tokens per pass (onnxruntime-genai, openvino-genai; "
        "off by default)",
    )
    parser.add_argument(
        "--engine",
        default="auto",
        choices=["auto", *GENERATING, OWN_LOOP],
        help="generate, serve: what runs the model (auto: of onnxruntime-genai, openvino-genai on openvino-genai/ "
        "and llama.cpp on gguf/model.gguf, the fastest the recipe measured that is installed here; serve: "
        "openvino-genai first, its continuous batching serves concurrent streams together; llama.cpp decodes one "
        "stream fastest and serves streams one after another)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="serve: the address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="serve: the port")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("OPTIMIZE_API_KEY"),
        help="serve: every request needs Authorization: Bearer KEY (default: $OPTIMIZE_API_KEY; none: open)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from .serve import serve

        try:
            return serve(args.artifact, args.host, args.port, args.api_key, engine=args.engine)
        except (ArtifactError, OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        model = load(args.artifact)
        texts = [args.prompt] if args.prompt is not None else _texts(args.input)
    except (ArtifactError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"provider: {model.provider}" + "".join(f"\n  not used: {n}" for n in model.fallbacks), file=sys.stderr)
    try:
        if args.command == "embed":
            for text, vector in zip(texts, model.embed(texts, args.batch_size), strict=True):
                print(json.dumps({"text": text, "embedding": [round(float(x), 7) for x in vector]}))
        elif args.command == "classify":
            for text, result in zip(texts, model.classify(texts, args.batch_size), strict=True):
                print(json.dumps({"text": text, **result}))
        else:
            _generate(model, texts, args)
    except (ArtifactError, ValueError) as exc:  # the model does not do what was asked, or its engine cannot load it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _generate(model: OnnxModel, texts: list[str], args: argparse.Namespace) -> None:
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        chat=args.chat,
        engine=model.generator(args.engine),
        speculate=args.speculate,
    )
    print(f"generating with {options['engine']}", file=sys.stderr)
    for text in texts:
        if args.stream:
            model.generate(text, **options, on_text=lambda piece: print(piece, end="", flush=True))
            print(flush=True)
        else:
            print(json.dumps({"text": text, "generated": model.generate(text, **options)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
