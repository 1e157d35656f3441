"""remove_eos=False (the official code's default): [question, eos, bot] ... [eot, eos], against the reference."""

from __future__ import annotations

import pytest
import torch

from interp import load_codi
from interp.patching import patch
from tests.reference import reference_patch_pair

QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"
CLEAN_Q, CORRUPTED_Q = "Tom has 3 apples and buys 5 more.", "Tom has 4 apples and buys 5 more."
MAX_NEW = 5
TOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def codi(request):
    """(reference, model loaded with remove_eos=False, tokenizer, clean and corrupted traces)."""
    ref, base, tok, paths = request.getfixturevalue("tiny_codi" if request.param == "llama" else "tiny_gpt2_codi")
    model = load_codi(paths["safetensors"], (base, tok), remove_eos=False, device="cpu")
    return ref, model, tok, (model.trace(CLEAN_Q), model.trace(CORRUPTED_Q))


def test_loop_feeds_eos_after_question_and_eot(codi):
    ref, model, tok, _ = codi
    eos = model.eos_id
    assert model.question_suffix_ids == (eos,) and model.eot_suffix_ids == (eos,) and model.load_options["remove_eos"] is False
    gen = model.generate(QUESTION, max_new_tokens=MAX_NEW)
    ids = tok(QUESTION)["input_ids"]
    latents, answer = ref.generate(ids, bot=model.bot_id, eot=model.eot_id, eos=eos, num_latents=6, max_new_tokens=MAX_NEW, remove_eos=False)
    assert gen.question_ids.tolist() == ids and gen.answer_ids.tolist() == answer
    assert (gen.latents - latents).abs().max() < TOL
    trace = model.trace(QUESTION, answer=8)
    tail = model.prefix_ids().tolist() + trace.answer_ids.tolist()
    embeds = ref.sequence_embeds(ids, trace.latents, tail, bot=model.bot_id, eot=model.eot_id, eos=eos, remove_eos=False)
    assert embeds.shape[1] == trace.seq_len
    expected = ref.codi(inputs_embeds=embeds).logits[0, trace.answer_position].detach()
    torch.testing.assert_close(trace.answer_logits, expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("strategy", ["parallel", "iterative"])
def test_patch_matches_reference(codi, strategy):
    ref, model, _, (clean, corrupted) = codi
    result = patch(model, corrupted, clean, "blocks.1.hook_resid_post", [1], strategy, with_cache=False)
    logits, fed = reference_patch_pair(ref, model, CLEAN_Q, CORRUPTED_Q, clean, corrupted, module="layer", layer=1, latents=[1], strategy=strategy, remove_eos=False)
    torch.testing.assert_close(result.answer_logits, logits, rtol=TOL, atol=TOL)
    torch.testing.assert_close(result.latents, fed, rtol=TOL, atol=TOL)


def test_decode_latents_reads_each_latent_position_of_the_reference(codi):
    """Latent t's `state` row is the reference's logits at latent t's own position, after the eos
    suffix (a position count that ignores the suffix reads `bot` as latent 0)."""
    ref, model, tok, _ = codi
    gen = model.generate(QUESTION, max_new_tokens=MAX_NEW)
    ids = tok(QUESTION)["input_ids"]
    embeds = ref.sequence_embeds(ids, gen.latents, [], bot=model.bot_id, eot=model.eot_id, eos=model.eos_id, remove_eos=False)
    logits = ref.codi(inputs_embeds=embeds).logits[0].detach()
    first = len(ids) + 2  # question, eos, bot
    for t, row in enumerate(model.decode_latents(gen, k=1)):
        probs = logits[first + t, : model.eot_id].softmax(-1)
        token, p = row["state"][0]
        assert token == model.tokenizer.decode([int(probs.argmax())]) and p == pytest.approx(float(probs.max()), rel=1e-4)
