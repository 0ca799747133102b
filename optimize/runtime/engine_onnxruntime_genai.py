"""onnxruntime-genai's engine: generates from the model builder's folder (genai_config.json) in its C++
loop, which keeps the KV cache in place and samples; prompt-lookup drafts checked several tokens per
pass where asked (`speculate`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .decoding import Drafts, Sampling, pick


class GenAIEngine:
    """An onnxruntime-genai model folder. On a machine without a GPU, a model built for CUDA runs on
    the CPU: the config's providers are cleared (the `-cuda` package also runs CPU models).

    With `speculate`, tokens are picked here (`pick`) from the logits the engine returns for every
    position it appends, and prompt-lookup drafts are checked several at a time: one forward pass
    over the next token and its drafts, the agreeing prefix kept, the cache rewound past the rest.
    Every emitted token is the pick from the logits after exactly the tokens before it, with one draw
    of the seeded generator each, so the output is the one of the same loop without drafts (greedy
    and sampled alike) as far as the engine computes a position the same alone or among several:
    fp32 and int4 with fp32 activations (accuracy level 1) agree within 5e-5, but int4 with int8
    activations (accuracy level 4, the builder's default) was measured to differ by up to 1.2 in a
    logit between one position and eight, which turns close calls. On 2 AVX2 cores checking drafts
    also costs about as much as it saves (SmolLM2: 56.0 tok/s with lookup, 56.1 without, on text
    that copies), so it is off by default. Without it, onnxruntime-genai's own loop picks."""

    def __init__(self, folder: Path, use_gpu: bool):
        import onnxruntime_genai as og

        config = og.Config(str(folder))
        if not use_gpu:
            config.clear_providers()
        self.og, self.model = og, og.Model(config)
        self.drafts = Drafts()  # the last generation's (its acceptance rate)

    def tokens(
        self, prompt_ids: list[int], sampling: Sampling, eos: set[int], speculate: bool = False
    ) -> Iterator[int]:
        if speculate:
            self.drafts = Drafts()
            return self.checked(prompt_ids, sampling, eos, self.drafts)
        return self._own_loop(prompt_ids, sampling, eos)

    def checked(self, prompt_ids: list[int], sampling: Sampling, eos: set[int], drafts: Drafts) -> Iterator[int]:
        """Tokens picked here, drafts checked in one pass each (none with `Drafts(most=0)`)."""
        end = len(prompt_ids) + sampling.max_new_tokens
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=end + 2)
        generator = self.og.Generator(self.model, params)
        rng = np.random.default_rng(sampling.seed)
        context = list(prompt_ids)
        generator.append_tokens([prompt_ids])
        after = generator.get_output("logits")[0, -1]  # the logits after the context
        pending: int | None = None  # a token picked where a draft was refused: the next one
        while len(context) < end:
            token = pick(after, sampling, rng) if pending is None else pending
            if token in eos:
                return
            yield token
            context.append(token)
            if len(context) == end:
                return
            guess = drafts.propose(context, end - len(context)) if drafts.most else []
            generator.append_tokens([[token, *guess]])
            rows = generator.get_output("logits")[0]  # rows[i]: after the token and guess[:i]
            pending, accepted = None, 0
            for row, draft in zip(rows, guess, strict=False):
                picked = pick(row, sampling, rng)
                if picked != draft:
                    pending = picked
                    break
                accepted += 1
            drafts.update(len(guess), accepted)
            for draft in guess[:accepted]:
                if draft in eos:
                    return
                yield draft
                context.append(draft)
            if pending is not None:
                generator.rewind_to(len(context))
            else:
                after = rows[-1]

    def _own_loop(self, prompt_ids: list[int], sampling: Sampling, eos: set[int]) -> Iterator[int]:
        params = self.og.GeneratorParams(self.model)
        options: dict[str, object] = {
            "max_length": len(prompt_ids) + sampling.max_new_tokens,
            "do_sample": sampling.temperature > 0,
        }
        if sampling.temperature > 0:
            options.update(temperature=sampling.temperature, top_k=sampling.top_k or 0, top_p=sampling.top_p)
            if sampling.seed is not None:
                options["random_seed"] = sampling.seed
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens([prompt_ids])
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in eos:
                return
            yield token
