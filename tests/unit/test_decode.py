"""Greedy decoding with drafts (speculative decoding with given continuations) against the official
loop recomputed in full (HF + peft, no KV cache, tests/reference.py): drafts change how many passes
the decode takes, never the tokens. On the tiny random model and on real SmolLM2 weights (whose
tokens depend on the context: a draft column left unmasked changes them)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from interp import load_codi
from interp.model import LOOKUP_TOKENS, draft_feed

QUESTIONS = ["Tom has 3 apples and buys 5 more.", "7 +5 *3 -2", "A box holds 12 eggs; 4 break."]
MAX_NEW = 10  # the tiny random model never emits eos: every decode runs to this length


@pytest.fixture(scope="module", params=["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def setup(request):
    if request.param == "tiny":
        ref, base, tok, paths = request.getfixturevalue("tiny_codi")
        return ref, load_codi(paths["safetensors"], (base, tok), device="cpu")
    ref, model, _, _ = request.getfixturevalue("smol_codi")
    return ref, model


def reference_ids(ref, model, question: str) -> list[int]:
    ids = model.tokenizer(question)["input_ids"]
    return ref.generate(ids, bot=model.bot_id, eot=model.eot_id, eos=model.eos_id, num_latents=model.num_latents, max_new_tokens=MAX_NEW)[1]


def decode(model, questions, drafts, monkeypatch, lookup: bool = True) -> tuple[list[list[int]], int]:
    """interp's decode of `questions` after their latent loop, with `drafts`; (ids per row, decode passes)."""
    with torch.no_grad():
        latents, cache, offsets = model.run_latents(questions)
        eot = model.tail_ids()[:1].expand(len(questions), -1)
        out = model.forward(model.embed(eot), kv_cache=cache, logit_positions=[0], start=cache.previous_attention_mask.shape[1], offsets=offsets)
        passes = []
        forward = model.forward
        monkeypatch.setattr(model, "forward", lambda *a, **k: passes.append(1) or forward(*a, **k))
        ids = model.greedy_decode(out.logits, None, cache, max_new_tokens=MAX_NEW, offsets=offsets, drafts=drafts, lookup=lookup)
        monkeypatch.undo()
    return [x.tolist() for x in ids], len(passes)


def test_draft_feed_takes_the_first_draft_that_agrees():
    assert draft_feed([5, 6], [[5, 7, 8], [5, 6, 9, 1, 2]], max_new_tokens=5, eos=0) == [6, 9, 1]  # up to the 4th token's input
    assert draft_feed([5, 6], [[5, 6, 9, 0, 2]], max_new_tokens=10, eos=0) == [6, 9]  # nothing from eos on
    assert draft_feed([5, 6], [[5, 6], [4, 6, 1]], max_new_tokens=10, eos=0, lookup=False) == [6]  # no draft goes further


def test_lookup_guesses_what_followed_the_latest_earlier_occurrence_of_the_last_tokens():
    assert draft_feed([5, 6], [[5, 6], [4, 6, 1]], max_new_tokens=10, eos=0) == [6, 1]  # "6" then 1 in the second draft
    assert draft_feed([7, 8, 9, 7, 8], [], max_new_tokens=20, eos=0) == [8, 9, 7, 8]  # the row's own loop: "7 8" then 9 7 8
    # the 2-gram "1 2" (then 5 2 9 1 2) wins over the later 1-gram "2" (then 9 1 2)
    assert draft_feed([3, 1, 2, 5, 2, 9, 1, 2], [], max_new_tokens=20, eos=0) == [2, 5, 2, 9, 1, 2]
    assert draft_feed([4, 5, 4], [], max_new_tokens=5, eos=0) == [4, 5]  # capped: 3 generated + 2 more = max_new_tokens
    assert draft_feed([2, 3], [[9, 3, 7, 0, 8]], max_new_tokens=20, eos=0) == [3, 7]  # nothing from eos on
    assert draft_feed([2, 3], [[9, 4]], max_new_tokens=20, eos=0) == [3]  # "3" occurs nowhere earlier
    assert draft_feed([1, 2, 3, 4, 5, 6, 7, 8, 9, 1], [], max_new_tokens=40, eos=0) == [1, *range(2, 2 + LOOKUP_TOKENS)]  # LOOKUP_TOKENS at most


def test_drafts_give_the_reference_tokens_in_fewer_passes(setup, monkeypatch):
    ref, model = setup
    want = [reference_ids(ref, model, q) for q in QUESTIONS]
    r = want[0]
    assert len(r) == MAX_NEW
    wrong = [(t + 1) % model.eot_id for t in r]
    cases = {  # drafts for question 0 -> decode passes expected (None: not asserted)
        "none": ([], MAX_NEW - 1),
        "exact": ([r], 1),
        "exact after one that disagrees at once": ([wrong, r], 1),
        "wrong from the 5th token": ([r[:4] + wrong[4:]], None),
        "switches to the second draft": ([r[:2] + wrong[2:], r], 2),
        "short": ([r[:3]], None),
    }
    for name, (drafts, passes) in cases.items():
        ids, n = decode(model, QUESTIONS[:1], [drafts], monkeypatch, lookup=False)
        assert ids == want[:1], name
        if passes is not None:
            assert n == passes, name
        else:
            assert 1 < n < MAX_NEW - 1, name
        ids, n_lookup = decode(model, QUESTIONS[:1], [drafts], monkeypatch)  # lookup guesses: same tokens, no more passes
        assert ids == want[:1] and n_lookup <= n, name
    ids, n = decode(model, QUESTIONS, [[r], [], [want[2][:5] + [0] * 5]], monkeypatch)  # rows with different drafts in one batch
    assert ids == want


def test_drafts_stop_at_eos(setup, monkeypatch):
    """With a token the model emits later made eos, a draft running past it ends there, as the reference does."""
    ref, model = setup
    q, r = next((q, r) for q in QUESTIONS if len(set(r := reference_ids(ref, model, q))) > 1)
    k = max(i for i in range(1, len(r)) if r[i] not in r[:i])  # the latest token that first appears there
    tok = copy.deepcopy(model.tokenizer)
    tok.eos_token = tok.convert_ids_to_tokens(r[k])
    m = dataclasses.replace(model, tokenizer=tok)
    assert m.eos_id == r[k]
    want = reference_ids(ref, m, q)
    assert want == r[: k + 1]
    ids, n = decode(m, [q], [[r]], monkeypatch)
    assert ids == [want] and n == 1
