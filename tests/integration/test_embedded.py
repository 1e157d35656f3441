"""The shipped embedded model: accuracy through load_codi, and the trainer -> load_codi round trip."""

from __future__ import annotations

import pytest
import torch

from interp import load_codi, load_default
from interp.train import train_preset
from interp.train.data import test_problems as held_out_problems
from interp.train.evaluate import student_generate


def test_shipped_model_is_accurate_on_held_out_problems():
    model = load_default()
    problems = held_out_problems()[:200]  # held out from training by seed and by question text
    gens = model.generate_batch([p.question for p in problems], max_new_tokens=8)
    accuracy = sum(g.answer == p.answer for g, p in zip(gens, problems)) / len(problems)
    assert accuracy >= 0.90, accuracy


def test_micro_training_round_trips_through_load_codi(tmp_path):
    torch.manual_seed(0)
    result = train_preset("micro", tmp_path)
    teacher = [r["loss"] for r in result.log if r["phase"] == "phase1-teacher"]
    assert teacher[-1] < teacher[0]
    model = load_codi(tmp_path / "model.safetensors", tmp_path / "base", answer_prefix="The answer is:", device="cpu")
    # the TransformerLens weights equal the trained network's (no folding, no centering)
    torch.testing.assert_close(model.model.W_E, result.llama.get_input_embeddings().weight.detach(), rtol=0, atol=0)
    for p in held_out_problems()[:10]:
        ours = model.generate(p.question, max_new_tokens=8)
        theirs = student_generate(result.llama, result.prj, model.tokenizer, p.question, max_new_tokens=8)
        assert ours.answer_ids.tolist() == list(theirs.answer_ids)
        torch.testing.assert_close(ours.latents, torch.as_tensor(theirs.latents).reshape(ours.latents.shape), rtol=1e-4, atol=1e-5)


def test_a_single_latent_patch_restores_exactly_the_steps_it_carries():
    """The arithmetic chain predicts, without running any patch, which single-latent patches flip
    the answer: the state at latent t is projected into latent t+1, which carries the running value
    after the number in slot t+2 (latent 0 carries slots 0-1). So an iterative patch of latent t
    restores the clean answer iff the changed number sits in a slot <= t+2; the last latent's state
    feeds nothing. A parallel patch holds the fed latents, which carry the answer, and flips none."""
    from interp.data import arithmetic_pairs, filter_by_model
    from interp.patching import patch
    from interp.trace import trace_pair

    model = load_default()
    by_slot = {}
    for pair in filter_by_model(model, arithmetic_pairs(60, seed=4), both=True):
        by_slot.setdefault(pair.source["changed_slot"], pair)
    assert sorted(by_slot) == list(range(7))
    for slot, pair in sorted(by_slot.items()):
        pt = trace_pair(model, pair)
        for t in range(model.num_latents):
            for strategy in ("parallel", "iterative"):
                result = patch(model, pt.corrupted, pt.clean, "blocks.1.hook_resid_post", [t], strategy)
                expected = strategy == "iterative" and t < model.num_latents - 1 and slot <= t + 2
                assert (result.answer == pair.clean_answer) == expected, (slot, t, strategy, result.answer)
