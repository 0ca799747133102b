"""optimize.stages.distill_training: the batches a step trains on (a function of the seed and the
step alone, so a resumed run trains on what it would have) and the learning-rate schedule."""

from __future__ import annotations

import itertools
import math

import pytest

from optimize.stages.distill_training import Settings, batch_texts, learning_rate


def settings(schedule: str) -> Settings:
    return Settings(
        steps=100, batch_size=4, accumulation=1, lr=1e-3, weight_decay=0.0, warmup=0.1, schedule=schedule,
        max_grad_norm=1.0, bf16=False, eval_every=10, checkpoint_every=10, seed=0,
    )  # fmt: skip


def test_a_step_trains_on_the_same_batch_whenever_it_is_asked_and_an_epoch_sees_every_text():
    texts = [f"text {i} " + "x" * (i % 7) for i in range(40)]
    epoch = [batch_texts(texts, step, 4, seed=3) for step in range(10)]
    assert batch_texts(texts, 7, 4, seed=3) == epoch[7]  # asked again (a resumed run): the same
    assert sorted(t for batch in epoch for t in batch) == sorted(texts)
    assert [batch_texts(texts, step, 4, seed=4) for step in range(10)] != epoch  # another seed, another order


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_the_learning_rate_warms_up_then_decays_to_zero_at_the_last_step(schedule):
    config = settings(schedule)
    rates = [learning_rate(config, step) for step in range(config.steps)]
    assert rates[0] == pytest.approx(1e-4) and max(rates) == pytest.approx(1e-3)
    assert rates.index(max(rates)) == 9  # the end of the warm-up (10% of 100 steps)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert learning_rate(config, config.steps) == pytest.approx(0.0, abs=1e-12)
    if schedule == "cosine":
        middle = 9 + (100 - 10) // 2 + 1
        assert rates[middle] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=0.05)
