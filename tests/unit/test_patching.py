"""Patching engine vs an independent full-recompute reference (HF forward hooks), and bad input."""

from __future__ import annotations

import pytest
import torch

from interp import load_codi
from interp.data.pairs import NumberChange, Pair
from interp.patching import PatchError, Site, patch, patch_sites
from interp.trace import trace_pair
from tests.reference import reference_patch_pair

CLEAN_Q, CORRUPTED_Q = "Tom has 3 apples and buys 5 more.", "Tom has 4 apples and buys 5 more."


@pytest.fixture(scope="module")
def setup(tiny_codi):
    ref, base, tok, paths = tiny_codi
    model = load_codi(paths["safetensors"], (base, tok), device="cpu")
    return ref, model, model.trace(CLEAN_Q), model.trace(CORRUPTED_Q)


HOOKS = {"layer": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}


@pytest.mark.parametrize("strategy", ["parallel", "iterative", "feedback"])
@pytest.mark.parametrize("module,layer,latents", [("layer", 0, [0]), ("layer", 1, [2]), ("layer", 2, [1, 3]), ("attn", 1, [0]), ("mlp", 0, [1])])
def test_matches_reference(setup, strategy, module, layer, latents):
    ref, model, clean, corrupted = setup
    result = patch(model, corrupted, clean, f"blocks.{layer}.{HOOKS[module]}", latents, strategy)
    logits, fed = reference_patch_pair(ref, model, CLEAN_Q, CORRUPTED_Q, clean, corrupted, module=module, layer=layer, latents=latents, strategy=strategy)
    torch.testing.assert_close(result.answer_logits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.latents, fed, rtol=1e-4, atol=1e-5)


def test_last_latent_same_for_both_strategies_first_latent_differs(setup):
    _, model, clean, corrupted = setup
    hook = "blocks.1.hook_resid_post"
    last = [patch(model, corrupted, clean, hook, [5], s) for s in ("parallel", "iterative")]
    torch.testing.assert_close(last[0].answer_logits, last[1].answer_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(last[0].latents, last[1].latents, rtol=0, atol=0)
    first = [patch(model, corrupted, clean, hook, [0], s) for s in ("parallel", "iterative")]
    assert (first[0].latents - first[1].latents).abs().max() > 1e-2  # later latents were regenerated
    assert (first[0].answer_logits - first[1].answer_logits).abs().max() > 1e-4


def test_iterative_patch_writes_only_at_its_own_step(setup):
    """Patching latent 2 leaves latents 0..2 as in the corrupted run and regenerates 3..5."""
    _, model, clean, corrupted = setup
    result = patch(model, corrupted, clean, "blocks.2.hook_resid_post", [2], "iterative")
    torch.testing.assert_close(result.latents[:3], corrupted.latents[:3], rtol=0, atol=1e-6)
    assert (result.latents[3:] - corrupted.latents[3:]).abs().max() > 1e-3


def test_head_patch_matches_manual_hook(setup):
    _, model, clean, corrupted = setup
    result = patch(model, corrupted, clean, "blocks.1.attn.hook_z", [1], "parallel", head=2)
    pos = corrupted.latent_positions[1]
    source = clean.cache["blocks.1.attn.hook_z"]

    def manual(z, hook):
        z[:, pos, 2] = source[:, pos, 2]
        return z

    expected = model.forward(corrupted.input_embeds[None], fwd_hooks=[("blocks.1.attn.hook_z", manual)]).logits[0, corrupted.answer_position]
    torch.testing.assert_close(result.answer_logits, expected, rtol=0, atol=1e-5)


def test_validity_identities(setup):
    _, model, clean, corrupted = setup
    every = tuple(range(corrupted.seq_len))
    for strategy in ("parallel", "iterative"):
        nothing = patch_sites(model, corrupted, clean, [], strategy)
        torch.testing.assert_close(nothing.answer_logits, corrupted.answer_logits, rtol=0, atol=1e-5)
        everything = patch_sites(model, corrupted, clean, [Site("blocks.0.hook_resid_pre", every)], strategy)
        torch.testing.assert_close(everything.answer_logits, clean.answer_logits, rtol=0, atol=1e-5)
        assert everything.answer == clean.answer
    # patching reads the traces and never writes into them
    torch.testing.assert_close(corrupted.input_embeds, model.trace(CORRUPTED_Q).input_embeds, rtol=0, atol=0)


@pytest.mark.parametrize(
    "hook,latents,head,message",
    [
        ("blocks.1.hook_resid_postt", [0], None, "unknown hook 'blocks.1.hook_resid_postt'; TransformerLens names look like"),
        ("blocks.7.hook_resid_post", [0], None, "layer 7 out of range in 'blocks.7.hook_resid_post': the model has layers 0..2"),
        ("blocks.1.hook_resid_post", [6], None, "latent index 6 out of range: latents are 0..5"),
        ("blocks.1.attn.hook_z", [0], 4, "head 4 out of range for 'blocks.1.attn.hook_z': heads are 0..3"),
        ("blocks.1.attn.hook_v", [0], 2, "head 2 out of range for 'blocks.1.attn.hook_v': heads are 0..1"),
        ("blocks.1.hook_resid_post", [0], 1, "a head index needs a per-head hook"),
        ("blocks.1.attn.hook_pattern", [0], None, "is not indexed by position on its second axis"),
    ],
)
def test_bad_input(setup, hook, latents, head, message):
    _, model, clean, corrupted = setup
    with pytest.raises(PatchError) as info:
        patch(model, corrupted, clean, hook, latents, "parallel", head=head)
    assert message in str(info.value)


def test_unknown_strategy_and_misaligned_traces(setup):
    _, model, clean, corrupted = setup
    with pytest.raises(PatchError, match="unknown strategy 'serial'"):
        patch(model, corrupted, clean, "blocks.0.hook_resid_post", [0], "serial")
    longer = model.trace(CORRUPTED_Q + " How many now?")
    with pytest.raises(PatchError, match=r"traces of different lengths \(corrupted \d+, clean \d+ positions\)"):
        patch(model, longer, clean, "blocks.0.hook_resid_post", [0], "parallel")


def test_pair_whose_answers_share_all_tokens_is_refused(setup):
    _, model, _, _ = setup
    pair = Pair("p", CLEAN_Q, CORRUPTED_Q, 8.0, 8.0, NumberChange("3", "4", (8, 9)))
    with pytest.raises(ValueError, match="share all their tokens"):
        trace_pair(model, pair)


def test_trace_pair_scores_first_differing_token(setup):
    """Llama-3 writes " 8" and " 9" as " " + digit: the scored token is the digit, after the space."""
    _, model, _, _ = setup
    pt = trace_pair(model, Pair("p", CLEAN_Q, CORRUPTED_Q, 8.0, 9.0, NumberChange("3", "4", (8, 9))))
    tok = model.tokenizer
    assert tok.decode([pt.clean_token]) == "8" and tok.decode([pt.corrupted_token]) == "9"
    assert pt.clean.seq_len == pt.clean.answer_position + 2  # the shared " " is teacher-forced
    assert tok.decode(pt.clean.tokens[-1:]) == " "


def test_hook_names_and_latents_as_transformer_lens_takes_them(setup):
    """(name, layer) tuples as get_act_name takes them, an int latent, and one-line refusals of a family name and a non-int latent."""
    _, model, clean, corrupted = setup
    by_name = patch(model, corrupted, clean, "blocks.1.hook_resid_post", [2], "iterative")
    by_tuple = patch(model, corrupted, clean, ("resid_post", 1), 2, "iterative")
    torch.testing.assert_close(by_tuple.answer_logits, by_name.answer_logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"'resid_post' names a hook family, not one hook: give a layer, e.g. \('resid_post', 3\)"):
        patch(model, corrupted, clean, "resid_post", 2, "parallel")
    with pytest.raises(PatchError, match="latents must be an int or a sequence of ints"):
        patch(model, corrupted, clean, ("resid_post", 1), "2", "parallel")
    with pytest.raises(PatchError, match="repeat an index"):
        patch(model, corrupted, clean, ("resid_post", 1), [2, 2], "parallel")


def test_at_positions_in_a_left_padded_batch_acts_at_each_questions_own_position(setup):
    """generate_batch left-pads questions of different lengths; a hook at an absolute position acts at each row's own position."""
    import interp

    _, model, _, _ = setup
    questions = [CLEAN_Q, CLEAN_Q + " How many now?"]
    pos = len(model.encode(CLEAN_Q)) + 2  # latent[1] of the first question, inside the second's question
    hook = ("blocks.1.hook_resid_post", interp.at_positions(lambda act, hook: act * 0, pos))
    batch = model.generate_batch(questions, max_new_tokens=4, fwd_hooks=[hook])
    for q, got in zip(questions, batch):
        alone = model.generate(q, max_new_tokens=4, fwd_hooks=[hook])
        torch.testing.assert_close(got.latents, alone.latents, rtol=1e-4, atol=1e-5)
        assert got.answer_ids.tolist() == alone.answer_ids.tolist()
    plain = model.generate(questions[0], max_new_tokens=4)
    assert (batch[0].latents[2] - plain.latents[2]).abs().max() > 1e-3  # the hook acted on the first question
