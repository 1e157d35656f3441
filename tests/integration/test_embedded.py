"""The shipped embedded model: accuracy through load_codi, and the trainer -> load_codi round trip."""

from __future__ import annotations

import torch

from interp import load_codi, load_default
from interp.train import train_preset
from interp.train.data import test_problems as held_out_problems
from interp.train.evaluate import student_generate


def test_shipped_model_is_accurate_on_held_out_problems():
    model = load_default("aligned")
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

    model = load_default("aligned")
    by_slot = {}
    for pair in filter_by_model(model, arithmetic_pairs(60, seed=4), both=True):
        by_slot.setdefault(pair.source["changed_slot"], pair)
    assert sorted(by_slot) == list(range(7))
    for slot, pair in sorted(by_slot.items()):
        pt = trace_pair(model, pair)
        for t in range(model.num_latents):
            for strategy in ("parallel", "iterative", "feedback"):  # feedback: the answer is read from the fed latents
                result = patch(model, pt.corrupted, pt.clean, "blocks.1.hook_resid_post", [t], strategy)
                expected = strategy != "parallel" and t < model.num_latents - 1 and slot <= t + 2
                assert (result.answer == pair.clean_answer) == expected, (slot, t, strategy, result.answer)


def test_mean_latents_drop_accuracy_to_the_model_cards_level():
    """Mean-latent patching (interp.Mean over other problems' traces, written at every fed latent,
    held: parallel): accuracy falls to chance, as the model card's "mean latent" row (9.7%)."""
    import interp

    model = load_default("aligned")
    problems = held_out_problems()
    others = [model.trace(p.question, names_filter="blocks.0.hook_resid_pre") for p in problems[200:300]]
    mean = interp.Mean(others)
    correct = 0
    tested = problems[:60]
    for p in tested:
        trace = model.trace(p.question, names_filter="blocks.0.hook_resid_pre")
        result = interp.patch(model, trace, trace, "blocks.0.hook_resid_pre", range(model.num_latents), "parallel", intervention=mean, with_cache=False)
        correct += result.answer == p.answer
    assert correct / len(tested) <= 0.30, correct / len(tested)


def test_user_hooks_at_absolute_positions_work_through_generate_trace_and_run_with_hooks():
    """Zeroing latent 3's residual at layer 2 with interp.at_positions: the same absolute position in the
    loop's one-position chunks, in the traced full pass and in run_with_hooks; checked against a
    hand-written hook on a full teacher-forced pass over the hooked loop's latents."""
    import interp

    model = load_default("aligned")
    question = held_out_problems()[0].question
    plain = model.trace(question)
    pos = plain.latent_positions[3]
    hook = ("blocks.2.hook_resid_post", interp.at_positions(lambda act, hook: torch.zeros_like(act), pos))
    gen = model.generate(question, fwd_hooks=[hook])
    torch.testing.assert_close(gen.latents[:4], plain.latents[:4], rtol=0, atol=1e-6)
    assert (gen.latents[4] - plain.latents[4]).abs().max() > 1e-3  # latent 4 projects the zeroed state
    traced = model.trace(question, fwd_hooks=[hook])
    assert float(traced.cache["blocks.2.hook_resid_post"][0, pos].abs().max()) == 0.0
    logits = model.run_with_hooks(question, fwd_hooks=[hook])

    def manual(act, hook):
        act[:, pos] = 0.0
        return act

    tokens, embeds = model.sequence(gen.question_ids, gen.latents)
    expected = model.forward(embeds[None], fwd_hooks=[("blocks.2.hook_resid_post", manual)]).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(traced.next_logits, expected[0, -1], rtol=0, atol=1e-5)
    _, cache = model.run_with_cache(question, fwd_hooks=[hook], names_filter="blocks.2.hook_resid_post")
    assert list(cache.keys()) == ["blocks.2.hook_resid_post"] and float(cache["blocks.2.hook_resid_post"][0, pos].abs().max()) == 0.0


def test_batched_measure_equals_the_cards_batch_one_evaluation():
    """`measure_batched` (batched latent loop, teacher-forced answer check) gives the card's numbers, which
    `evaluate_model` measured one problem at a time with greedy decoding."""
    import json

    from interp.loading import EMBEDDED_DIR
    from interp.train.evaluate import measure_batched
    from interp.train.modeling import load_checkpoint

    card = json.loads((EMBEDDED_DIR / "metrics.json").read_text())
    llama, prj = load_checkpoint(EMBEDDED_DIR / "model.safetensors", EMBEDDED_DIR / "base")
    m = measure_batched(llama, prj, n_pairs=200)
    for key in ("student_accuracy", "zeroed_latents_accuracy", "mean_latents_accuracy"):
        assert round(m[key] * 1000) == round(card[key] * 1000), key  # counts out of 1,000
    assert m["swap"]["clean_answer_rate"] > 0.95 and m["swap"]["corrupted_answer_rate"] < 0.02
