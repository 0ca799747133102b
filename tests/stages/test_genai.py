"""Decoders through onnxruntime-genai's model builder (the genai stage) and the runtime's generation:
sampling with a seed, stop strings, streaming. A tiny random Llama, seconds each."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from optimize.cli.commands import app
from optimize.runtime.decoding import Drafts, Sampling, lookup, pick
from optimize.runtime.engine_onnxruntime_genai import GenAIEngine
from tests.conftest import write_recipe

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def built(tiny_llama, tmp_path_factory):
    """The tiny Llama through a genai stage whose first candidate (int4) cannot hold the gate."""
    folder = tmp_path_factory.mktemp("genai")
    stage = {
        "kind": "genai",
        "candidates": [{"precision": "int4", "block_size": 32}, {"precision": "fp32"}],
        "gate": [{"metric": "top1_agreement", "min": 0.999}, {"metric": "kl_div", "max": 1e-4}],
    }
    recipe = write_recipe(folder, [stage], model=str(tiny_llama))
    out = folder / "out"
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out


def load(artifact):
    sys.path.insert(0, str(artifact))
    try:
        import runtime

        return runtime.load(artifact, available=["CPUExecutionProvider"])
    finally:
        sys.path.remove(str(artifact))
        for name in [m for m in sys.modules if m == "runtime" or m.startswith("runtime.")]:
            sys.modules.pop(name)


def test_the_builder_search_records_every_candidate_and_keeps_the_first_that_holds(built):
    manifest = json.loads((built / "manifest.json").read_text())
    decisions = manifest["stages"][0]["details"]
    assert [c["passed"] for c in decisions["candidates"]] == [False, True]
    assert decisions["chosen"] == "fp32" and manifest["runtime"]["engine"] == "onnxruntime-genai"
    assert {"genai_config.json", "model.onnx", "tokenizer.json", "config.json"} <= set(manifest["files"])


def test_each_step_of_the_run_is_costed_in_the_measurements_and_the_report_not_the_manifest(built):
    rows = json.loads((built / "measurements.json").read_text())["costs"]
    steps = [row["step"] for row in rows]
    assert "costs" not in json.loads((built / "manifest.json").read_text())
    assert steps.count("onnxruntime-genai model builder") == 2  # both candidates were built
    assert "reference" in steps and steps[-1] == "stage 0 (genai): its output"  # ran now or replayed from the cache
    builder = next(row for row in rows if row["step"] == "onnxruntime-genai model builder")
    assert builder["seconds"] > 0 and builder["worker_peak_rss_mb"] > 50  # the builder process's own peak
    stage = next(row for row in rows if row["step"] == "stage 0 (genai)")
    inner = [row for row in rows if row["step"].startswith("measure candidate-")]
    assert len(inner) == 2 and stage["peak_rss_mb"] >= max(row["peak_rss_mb"] for row in inner)  # nested
    assert stage["seconds"] >= sum(row["seconds"] for row in inner)
    assert "## Cost per step" in (built / "report.md").read_text()


def test_greedy_generation_through_genai_equals_torch(built, tiny_llama):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model = load(built)
    text = model.generate("the model", max_new_tokens=8)
    assert list(model._engines) == ["onnxruntime-genai"]  # onnxruntime-genai made it
    torch_model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = Tokenizer.from_file(str(built / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode("the model").ids])
    expected = torch_model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert text == tokenizer.decode(expected.tolist())


def test_sampling_repeats_with_its_seed_and_streams_the_same_text_it_returns(built):
    model = load(built)
    options = {"max_new_tokens": 12, "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    first = model.generate("the model", seed=3, **options)
    pieces: list[str] = []
    again = model.generate("the model", seed=3, on_text=pieces.append, **options)
    assert first == again == "".join(pieces) and len(pieces) > 1
    assert model.generate("the model", seed=4, **options) != first


def test_generation_ends_before_a_stop_string(built):
    model = load(built)
    full = model.generate("the model", max_new_tokens=12)
    stop = full[4:7]
    assert stop and model.generate("the model", max_new_tokens=12, stop=[stop]) == full[: full.find(stop)]


def test_the_sampler_follows_temperature_top_k_and_top_p():
    logits = np.array([0.0, 3.0, 1.0, 2.9])
    rng = np.random.default_rng(0)
    assert pick(logits, Sampling(), rng) == 1  # greedy
    assert {pick(logits, Sampling(temperature=5.0, top_k=1), rng) for _ in range(20)} == {1}
    assert {pick(logits, Sampling(temperature=1.0, top_p=0.5), rng) for _ in range(50)} <= {1, 3}
    drawn = {pick(logits, Sampling(temperature=100.0), rng) for _ in range(200)}
    assert drawn == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def test_a_chat_prompt_is_rendered_by_the_models_template_and_refused_without_one(built, tmp_path):
    from optimize.runtime.decoding import chat_prompt

    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
    template += "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))
    assert chat_prompt(tmp_path, "Hi") == "<|user|>Hi</s><|assistant|>"
    with pytest.raises(ValueError, match="no chat template"):
        load(built).generate("Hi", chat=True)


def test_minmax_int4_lands_exactly_on_weights_dequantized_from_a_4_bit_grid(tiny_llama, tmp_path):
    """Weights put on a Q4_1-style grid (blocks of 32: d * q + m) come back exactly: the int4 model
    then agrees with its float reference as closely as float activations allow."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "on-grid"
    shutil.copytree(tiny_llama, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                out, k = module.weight.shape
                scale = torch.rand(out, k // 32, 1, generator=generator) * 0.02 + 0.005
                low = -torch.rand(out, k // 32, 1, generator=generator) * 0.1
                q = torch.randint(0, 16, (out, k // 32, 32), generator=generator).float()
                q[..., 0], q[..., 1] = 0, 15  # every block spans its grid, as Q4_1's do
                module.weight.copy_((low + scale * q).reshape(out, k))
    model.config.tie_word_embeddings = False
    model.save_pretrained(folder, safe_serialization=True)
    stage = {
        "kind": "genai",
        "candidates": [{"precision": "int4", "algorithm": "minmax", "accuracy_level": 1}],
        "gate": [{"metric": "top1_agreement", "min": 0.99}, {"metric": "kl_div", "max": 1e-3}],
    }
    recipe = write_recipe(tmp_path, [stage], model=str(folder))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    tried = json.loads((out / "manifest.json").read_text())["stages"][0]["details"]["candidates"][0]
    assert tried["reconstruction"]["max_error_4bit"] < 1e-6
    assert "max_error_embedding" in tried["reconstruction"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "MatMul" in ops  # the 4-bit weights, and the blocks' minimums
    assert "GatherBlockQuantized" in ops  # the 8-bit embedding
    assert load(out).generate("the model", max_new_tokens=4)  # onnxruntime-genai runs it


def _prompts(count: int) -> list[list[int]]:
    """Token prompts, half of them copy-heavy (a phrase said three times), half not."""
    rng = np.random.default_rng(0)
    phrases = [[int(t) for t in rng.integers(3, 290, 5)] * 3 for _ in range(count // 2)]
    return phrases + [[int(t) for t in rng.integers(3, 290, 15)] for _ in range(count - count // 2)]


def test_prompt_lookup_gives_the_tokens_plain_decoding_gives(built):
    """Greedy and seeded sampling alike, over many prompts: the same tokens with drafts as with one
    token per pass, and as onnxruntime-genai's own greedy loop. Logits over several positions differ
    from one at a time by float rounding, so a divergence may only start at an exact near-tie."""
    engine = GenAIEngine(built, use_gpu=False)
    proposed = accepted = 0
    for index, prompt in enumerate(_prompts(24)):
        greedy = Sampling(max_new_tokens=24)
        plain = list(engine.checked(prompt, greedy, set(), Drafts(most=0)))
        drafts = Drafts()
        fast = list(engine.checked(prompt, greedy, set(), drafts))
        proposed, accepted = proposed + drafts.proposed, accepted + drafts.accepted
        own = list(engine.tokens(prompt, greedy, set(), speculate=False))  # ends at the model's own EOS too
        assert own and plain[: len(own)] == own
        if fast != plain:
            first = next(i for i, (a, b) in enumerate(zip(fast, plain, strict=True)) if a != b)
            top = np.sort(_logits_after(engine, prompt + plain[:first]))[-2:]
            assert top[1] - top[0] < 1e-3, (index, first)
        sampled = Sampling(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=index)
        assert list(engine.checked(prompt, sampled, set(), Drafts())) == list(
            engine.checked(prompt, sampled, set(), Drafts(most=0))
        )
    assert accepted > 0 and proposed > accepted  # drafts were checked, kept and refused


def _logits_after(engine: GenAIEngine, ids: list[int]) -> np.ndarray:
    params = engine.og.GeneratorParams(engine.model)
    params.set_search_options(max_length=len(ids) + 1)
    generator = engine.og.Generator(engine.model, params)
    generator.append_tokens([ids])
    return np.asarray(generator.get_output("logits")[0, -1])


def test_lookup_drafts_what_followed_the_latest_match_and_backs_off_when_refused():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]  # the latest 3-gram match
    assert lookup([5, 6, 4, 7, 6], 2) == [4, 7]  # no 3- or 2-gram: the last token alone
    assert lookup([1, 2, 3], 4) == []
    drafts = Drafts()
    drafts.update(4, 4)
    assert drafts.size == 8 and drafts.pause == 0  # all kept: check more next time
    drafts.update(8, 0)
    drafts.update(1, 0)
    assert (drafts.size, drafts.pause) == (1, 3)  # twice refused: pause 3 steps
    assert [drafts.propose([1, 2, 1, 2], 8) for _ in range(4)] == [[], [], [], [1]]
    assert (drafts.proposed, drafts.accepted) == (13, 4)


def test_sampling_with_drafts_draws_from_the_distribution_plain_sampling_draws_from(built):
    """Seeded sampling through drafts (tokens picked here, drafts checked several at a time) against
    onnxruntime-genai's own sampling loop, 200 seeds each: at every position the token frequencies
    agree within a chi-square test (top 2, where drafts are often kept), and the same test tells a
    lower temperature apart (its power)."""
    from scipy.stats import chi2_contingency

    engine = GenAIEngine(built, use_gpu=False)
    prompt = _prompts(2)[0]  # a phrase said three times: drafts are proposed and some are kept

    def draws(temperature: float, drafted: bool) -> tuple[list[list[int]], int]:
        rows, kept = [], 0
        for seed in range(200):
            sampling = Sampling(max_new_tokens=6, temperature=temperature, top_k=2, seed=seed)
            drafts = Drafts()
            own = engine.checked(prompt, sampling, set(), drafts) if drafted else engine.tokens(prompt, sampling, set())
            rows.append(list(own))
            kept += drafts.accepted
        return rows, kept

    def p_values(a: list[list[int]], b: list[list[int]]) -> list[float]:
        found = []
        for position in range(6):
            x, y = ([row[position] for row in rows if len(row) > position] for rows in (a, b))  # EOS ends some
            kinds = sorted(set(x) | set(y))
            found.append(float(chi2_contingency([[x.count(k) for k in kinds], [y.count(k) for k in kinds]]).pvalue))
        return found

    (ours, kept), (plain, _) = draws(1.0, True), draws(1.0, False)
    assert kept >= 10  # drafts were checked and kept while sampling
    assert min(p_values(ours, plain)) > 1e-3
    assert min(p_values(ours, draws(0.01, False)[0])) < 1e-3  # a sharper distribution is told apart


def test_a_checkpoint_that_names_no_architecture_is_refused_before_the_reference_is_measured(tiny_llama, tmp_path):
    import shutil

    folder = tmp_path / "nameless"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]  # a config saved on its own (LlamaConfig.save_pretrained), not by the model
    (folder / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path, [{"kind": "genai"}], model=str(folder))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "names no `architectures`" in said and "Traceback" not in said and "reference" not in said
    assert not (tmp_path / "out").exists()


def test_an_architecture_the_builder_does_not_build_is_refused_before_the_reference_naming_the_routes(
    tiny_llama, tmp_path
):
    """GPT-2 is no architecture of the model builder's: exit 2 at the pre-flight, the compile route
    named; `--dry-run` says the same per stage, and the compile route with its KV cache."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    shutil.copyfile(tiny_llama / "tokenizer.json", folder / "tokenizer.json")
    recipe = write_recipe(tmp_path, [{"kind": "genai"}, {"kind": "compile"}], model=str(folder))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out")])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "does not build GPT2LMHeadModel" in said and "`kind: compile`" in said
    assert "Traceback" not in said and "reference" not in said and not (tmp_path / "out").exists()
    dry = CliRunner().invoke(app, ["run", str(recipe), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "#   genai: refused: genai: onnxruntime-genai" in dry.output
    assert "#   compile: torch.onnx export, kv-cache" in dry.output


def test_a_builder_that_fails_inside_is_one_line_naming_it_and_its_version(tiny_llama, tmp_path, monkeypatch):
    """The builder's own failure (here: a Phi-3 config it cannot read) is exit 1 with its version and
    its last line, never a traceback."""
    from optimize.models import routes
    from optimize.stages import genai_build

    def failing(command, log_path):
        return 1, "Traceback (most recent call last):\n  File builder.py\nKeyError: 'multi_cache'\n", 0.1

    monkeypatch.setattr(genai_build, "_builder", failing)
    recipe = write_recipe(tmp_path, [{"kind": "genai", "candidates": [{"precision": "fp32"}]}], model=str(tiny_llama))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    said = f"onnxruntime-genai {routes.builder_version()}'s model builder failed for fp32: KeyError: 'multi_cache'"
    assert said in error
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_a_graph_the_builder_wrote_that_does_not_load_is_one_line_naming_the_builder(tiny_llama, tmp_path, monkeypatch):
    """A graph onnxruntime refuses (the builder's tied int8 LM head did) is exit 1 naming the builder
    and onnxruntime's words, not a traceback."""
    from optimize.stages import genai_build

    built = genai_build.build

    def broken(checkpoint, out, *args):
        errors = built(checkpoint, out, *args)
        (out / "model.onnx").write_bytes(b"not a graph")
        return errors

    monkeypatch.setattr("optimize.stages.genai.build", broken)
    recipe = write_recipe(tmp_path, [{"kind": "genai", "candidates": [{"precision": "fp32"}]}], model=str(tiny_llama))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 1, result.output
    error = json.loads(result.stdout)["error"]
    assert "model builder wrote a graph for fp32 that does not load" in error and "onnxruntime" in error
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_the_dry_run_names_each_formats_own_route_with_what_the_recipe_asks_of_it(tiny_llama, tmp_path):
    """gguf's types go to gguf, compressed-tensors' int4 methods to compressed-tensors (a route once
    printed compressed-tensors at gguf's types)."""
    pytest.importorskip("compressed_tensors")
    stage = {"kind": "genai", "formats": ["compressed-tensors"], "int4_methods": ["gptq", "rtn"]}
    recipe = write_recipe(tmp_path, [stage], model=str(tiny_llama))
    dry = CliRunner().invoke(app, ["run", str(recipe), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    said = " ".join(dry.output.split())
    assert "format compressed-tensors: symmetric int4-gptq-g32, then int4-rtn-g32, then int8" in said
