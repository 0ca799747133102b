"""optimize.runtime.decoding: how the runtime turns logits into text, whatever engine made them:
greedy and sampled picks, stop strings held back until they cannot match, prompt lookup and its
draft sizes, and the KV-cache loop over a step function."""

from __future__ import annotations

import numpy as np
import pytest

from optimize.runtime.decoding import Drafts, Sampling, Text, kv_loop, lookup, pick, stream


def test_greedy_picks_the_largest_logit_and_top_k_one_is_greedy_whatever_the_seed():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert pick(logits, Sampling(), np.random.default_rng(0)) == 1
    sampled = Sampling(temperature=5.0, top_k=1)
    assert {pick(logits, sampled, np.random.default_rng(seed)) for seed in range(20)} == {1}


def test_top_p_keeps_only_the_tokens_inside_the_probability_mass():
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    sampling = Sampling(temperature=1.0, top_p=0.8)
    drawn = {pick(logits, sampling, np.random.default_rng(seed)) for seed in range(200)}
    assert drawn == {0, 1}


def test_bad_sampling_values_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sampling(max_new_tokens=0)


def test_text_holds_back_what_could_still_become_a_stop_string():
    pieces = {1: "Hello", 2: " EN", 3: "D", 4: " more"}
    text = Text(lambda ids: "".join(pieces[i] for i in ids), stop=["END"])
    assert text.add(1) == ("Hel", False)  # the last two characters could begin "END": held back
    assert text.add(2) == ("lo ", False)  # "EN" is held back
    assert text.add(3) == ("", True)  # the stop string: nothing of it is handed out
    assert text.sent == len("Hello ")


def test_stream_ends_at_max_new_tokens_and_hands_out_every_piece_once():
    tokens = iter(range(100))
    got: list[str] = []
    whole = stream(tokens, lambda ids: "".join(chr(97 + i % 26) for i in ids), Sampling(max_new_tokens=5), got.append)
    assert whole == "abcde" and "".join(got) == whole


def test_prompt_lookup_proposes_what_followed_the_last_ngram_and_nothing_when_it_never_occurred():
    assert lookup([5, 6, 7, 8, 9, 5, 6], count=3) == [7, 8, 9]
    assert lookup([1, 2, 3, 4], count=3) == []


def test_drafts_double_while_accepted_and_pause_longer_after_each_miss():
    drafts = Drafts(most=8, size=2)
    drafts.update(drafted=2, accepted=2)
    assert drafts.size == 4
    drafts.update(drafted=4, accepted=0)
    assert drafts.size == 1 and drafts.pause == 1
    assert drafts.propose([1, 2, 1], room=4) == []  # paused: no lookup this step
    drafts.update(drafted=1, accepted=0)
    assert drafts.pause == 3
    assert drafts.proposed == 7 and drafts.accepted == 2


def test_the_kv_loop_feeds_the_prompt_once_then_one_token_with_the_cache_until_the_end_token():
    calls: list[tuple[list[int], int]] = []

    def step(ids: np.ndarray, past: dict[str, np.ndarray] | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        seen = 0 if past is None else int(past["seen"][0])
        calls.append((ids[0].tolist(), seen))
        logits = np.zeros((1, ids.shape[1], 10))
        logits[0, -1, (int(ids[0, -1]) + 1) % 10] = 1.0  # the next token is the last one plus one
        return logits, {"seen": np.array([seen + ids.shape[1]])}

    tokens = list(kv_loop(step, [3, 4], Sampling(max_new_tokens=10), eos={8}))
    assert tokens == [5, 6, 7]
    assert calls == [([3, 4], 0), ([5], 2), ([6], 3), ([7], 4)]
