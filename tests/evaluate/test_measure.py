"""optimize.evaluate.measure: fidelity figures (cosine, top-1 agreement, KL) and the evaluator's
reference, named when it is made, whatever was measured before."""

from __future__ import annotations

import numpy as np

from optimize import tasks
from optimize.evaluate.measure import Evaluator, fidelity
from optimize.models.loading import open_any


def test_identical_outputs_are_perfectly_faithful_and_opposite_ones_are_not():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(70, 16)).astype(np.float32)  # more rows than are compared at a time
    same = fidelity(reference.copy(), reference)
    assert same == {"cosine_mean": 1.0, "cosine_min": 1.0}
    opposite = fidelity(-reference, reference)
    assert opposite["cosine_mean"] == -1.0


def test_logits_add_top1_agreement_and_kl_divergence():
    reference = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    swapped = np.array([[0.0, 2.0, 0.0], [0.0, 2.0, 0.0]])
    figures = fidelity(swapped, reference, tasks.GENERATION)
    assert figures["top1_agreement"] == 0.5
    assert figures["kl_div"] > 0
    assert fidelity(reference, reference, tasks.GENERATION)["kl_div"] == 0.0


def test_the_evaluator_measures_fidelity_against_the_reference_it_was_given(tiny_bert):
    handle = open_any(str(tiny_bert))
    texts = ["a first sentence", "another one, longer than the first", "short"]
    evaluator = Evaluator(texts, speed=None, reference=handle, seq_len=32)
    assert evaluator.probe(handle)["cosine_min"] > 0.9999  # the reference against itself
    first = evaluator.outputs_of(handle)
    assert first.shape[0] == len(texts)
    assert evaluator.outputs_of(handle) is first  # computed once, kept for the run
