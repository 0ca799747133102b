"""llama.cpp's engine: generates from an artifact's gguf/model.gguf through llama-cpp-python, fed
the artifact's own tokens (one sequence per context)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from .decoding import Sampling


class LlamaCppEngine:
    """The artifact's `gguf/model.gguf` through llama-cpp-python (llama.cpp's own kernels and
    sampler): what generates where onnxruntime-genai is not installed, or when asked for by name.
    Sampling is ours in meaning: no min-p, repeat penalty or top-k unless set. `speculate` is not
    taken here: llama-cpp-python's prompt lookup needs the logits of every position of the context
    kept (`logits_all`: 4 bytes x vocabulary x context, 1.6 GB for SmolLM2's 8k) and aborts the
    process without them; checking drafts through its low-level batch (logits of the batch only)
    does not pay on CPUs like the 2 AVX2 cores here either: one `llama_decode` of k tokens after a
    150-token prompt cost k=2 1.88x one token, 4 2.79x, 8 4.33x, 32 11.8x (SmolLM2's Q4_1)."""

    def __init__(self, path: Path, threads: int | None):
        import llama_cpp

        # n_ctx 0: the context the model was trained for. Threads: every core, as the gate ran it
        # (llama-cpp-python's own default is half of them: decode 19.6 ms a token instead of 14.5 on
        # SmolLM2's GGUF here, 2 cores)
        threads = threads or os.cpu_count() or 1
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=0, n_threads=threads, verbose=False)

    def tokens(
        self, prompt_ids: list[int], sampling: Sampling, eos: set[int], speculate: bool = False
    ) -> Iterator[int]:
        if sampling.seed is not None:
            self.llm.set_seed(sampling.seed)
        options = {"temp": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p, "min_p": 0.0}
        tokens = self.llm.generate(prompt_ids, **options, repeat_penalty=1.0, reset=True)
        for token in islice(tokens, sampling.max_new_tokens):  # llama.cpp's own goes on to the context's end
            if token in eos or token == self.llm.token_eos():
                return
            yield int(token)
