"""The earlier study's procedure (interp.analysis.earlier_study) on a tiny random CODI: its inputs, its
patchers against plain PyTorch forward hooks on the HF model, and the steps that make iterative equal parallel."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from interp import load_codi
from interp.analysis.earlier_study import (
    ablation_table,
    after_latents_kl,
    earlier_procedure,
    iterative_minus_parallel,
    iterative_patch,
    kl_per_position,
    loop_embeds,
    loop_patch,
    pad_sequence,
    parallel_patch,
    question_kl,
    resid_hook,
)
from interp.data.pairs import NumberChange, Pair
from interp.metrics import kl_divergence
from interp.patching import patch
from tests.reference import _replace_output

CLEAN_Q, CORRUPTED_Q = "Tom has 3 apples and buys 5 more.", "Tom has 4 apples and buys 5 more."
PAIR = Pair("tom", CLEAN_Q, CORRUPTED_Q, 8.0, 9.0, NumberChange("3", "4", (8, 9)))
PAIR2 = Pair("tom2", "Tom has 6 apples and buys 5 more.", "Tom has 2 apples and buys 5 more.", 11.0, 7.0, NumberChange("6", "2", (8, 9)))


@pytest.fixture(scope="module")
def setup(tiny_codi, one_thread):
    ref, base, tok, paths = tiny_codi
    model = load_codi(paths["safetensors"], (base, tok), device="cpu")
    clean_tokens, layout = pad_sequence(model, CLEAN_Q)
    corrupted_tokens, _ = pad_sequence(model, CORRUPTED_Q)
    with torch.no_grad():
        clean = model.forward(model.embed(clean_tokens[None]), with_cache=True)
        corrupted = model.forward(model.embed(corrupted_tokens[None]), with_cache=True)
    return ref, model, layout, clean_tokens, corrupted_tokens, clean, corrupted


def test_pad_sequence_tokens(setup):
    _, model, layout, clean_tokens, _, _, _ = setup
    question = [128000, 25763, 706, 220, 18, 41776, 323, 50631, 220, 20, 810, 13]  # <|begin_of_text|> Tom has ' ' 3 apples and buys ' ' 5 more .
    bot, pad, eot = 128257, 128256, 128258
    prefix = [791, 4320, 374, 25]  # The answer is :
    assert (model.pad_id, model.bot_id, model.eot_id) == (pad, bot, eot)
    assert clean_tokens.tolist() == question + [bot] + [pad] * 6 + [eot] + prefix
    assert layout.latent_positions == [13, 14, 15, 16, 17, 18] and layout.eot == layout.decode_start == 19 and layout.n_question == 12
    with_answer, layout_a = pad_sequence(model, CLEAN_Q, torch.tensor([220]))
    assert with_answer.tolist() == question + [bot] + [pad] * 6 + [eot] + prefix + [220] and layout_a.seq_len == 25


@pytest.mark.parametrize("layer,n", [(0, 0), (1, 2), (2, 5)])
def test_parallel_patch_matches_hf_forward_hooks(setup, layer, n):
    ref, model, layout, clean_tokens, corrupted_tokens, clean, _ = setup
    positions = layout.latent_positions[: n + 1]
    logits = parallel_patch(model, model.embed(corrupted_tokens[None]), clean.cache[resid_hook(layer)], layer, positions)
    clean_out = ref.layer_outputs(ref.embed(clean_tokens.tolist()))[layer]  # [seq, d], plain HF forward hooks
    handle = _replace_output(ref.module("layer", layer), positions, clean_out[positions])
    try:
        with torch.no_grad():
            expected = ref.codi(inputs_embeds=ref.embed(corrupted_tokens.tolist())).logits[0]
    finally:
        handle.remove()
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        unpatched = model.forward(model.embed(corrupted_tokens[None])).logits[0]
    assert (logits[0, positions[-1]] - unpatched[positions[-1]]).abs().max() > 1e-4  # the patch did something


@pytest.mark.parametrize("layer", [0, 1])
def test_iterative_equals_parallel_under_the_earlier_procedure_and_not_when_it_carries(setup, layer, monkeypatch):
    _, model, layout, _, corrupted_tokens, clean, corrupted = setup
    embeds, resid = model.embed(corrupted_tokens[None]), clean.cache[resid_hook(layer)]
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    for n in range(model.num_latents):
        positions = layout.latent_positions[: n + 1]
        par = parallel_patch(model, embeds, resid, layer, positions)
        calls.clear()
        it = iterative_patch(model, embeds, resid, layer, positions)
        assert it.passes == len(calls) == n + 1  # really N + 1 passes
        assert (it.logits - par).abs().max() <= 1e-6
        # the regenerated activation at layer L is the corrupted run's own: a write at layer L cannot reach layer L later on
        torch.testing.assert_close(it.regenerated, corrupted.cache[resid_hook(layer)][:, [p + 1 for p in positions]], rtol=0, atol=1e-6)
        carried = iterative_patch(model, embeds, resid, layer, positions, carry="regenerated")
        if n >= 2:  # latents 1..N-1 carry what was regenerated there: the equality test can fail
            assert (carried.logits - par).abs().max() > 1e-4
        else:
            assert (carried.logits - par).abs().max() <= 1e-6


def test_kl_is_zero_at_question_positions_and_positive_after_a_patched_latent(setup):
    _, model, layout, _, corrupted_tokens, clean, corrupted = setup
    positions = layout.latent_positions[:2]
    embeds = model.embed(corrupted_tokens[None])
    patched = parallel_patch(model, embeds, clean.cache[resid_hook(1)], 1, positions)
    effect = kl_per_position(corrupted.logits, patched)[0]  # the patch's own effect at each position
    assert torch.equal(effect[: layout.n_question], torch.zeros(layout.n_question, dtype=effect.dtype))
    assert (effect[positions[0] :] > 0).all()  # small: clean and corrupted pad positions differ little in a random model
    # a larger write (the real loop's clean activations) makes the same point far above float rounding
    with torch.no_grad():
        loop_resid = model.forward(loop_embeds(model, [CLEAN_Q]), with_cache=True, names_filter=[resid_hook(1)]).cache[resid_hook(1)]
    big = kl_per_position(corrupted.logits, parallel_patch(model, embeds, loop_resid, 1, positions))[0]
    assert torch.equal(big[: layout.n_question], torch.zeros(layout.n_question, dtype=big.dtype)) and (big[positions[0] :] > 0).all()
    assert (big[positions] > 1e-2).all() and (big[layout.eot + 1 :] > 1e-5).all()  # (the later pads and eot of this random model barely read the latents)
    assert torch.equal(question_kl(clean.logits, patched, layout), question_kl(clean.logits, corrupted.logits, layout))
    assert after_latents_kl(corrupted.logits, patched, layout).item() > 1e-8
    for p in (0, layout.eot):  # the vectorized KL is interp.metrics.kl_divergence at each position
        assert kl_per_position(clean.logits, patched)[0, p].item() == pytest.approx(kl_divergence(clean.logits[0, p], patched[0, p]), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("strategy", ["parallel", "iterative"])
def test_the_loop_variant_is_interp_patch(setup, strategy):
    _, model, layout, _, _, _, _ = setup
    clean_trace, corrupted_trace = model.trace(CLEAN_Q), model.trace(CORRUPTED_Q)
    with torch.no_grad():
        clean_loop = model.forward(loop_embeds(model, [CLEAN_Q]), with_cache=True, names_filter=[resid_hook(1)])
    positions = layout.latent_positions[:3]
    if strategy == "parallel":
        logits = parallel_patch(model, loop_embeds(model, [CORRUPTED_Q]), clean_loop.cache[resid_hook(1)], 1, positions)
    else:
        logits = loop_patch(model, [CORRUPTED_Q], clean_loop.cache[resid_hook(1)], 1, positions)
    expected = patch(model, corrupted_trace, clean_trace, resid_hook(1), [0, 1, 2], strategy).answer_logits
    torch.testing.assert_close(logits[0, layout.answer_position], expected, rtol=1e-4, atol=1e-4)


def test_earlier_procedure_rows_and_ablation_table(setup):
    model = setup[1].with_latents(3)  # latents 0..2: the smallest N at which carrying differs is 2
    rows = {v: earlier_procedure(model, [PAIR, PAIR2], layers=[1], variant=v) for v in ("earlier", "regenerated", "loop")}
    earlier = rows["earlier"]
    assert len(earlier) == 2 * 1 * 3 * 2 and set(earlier.procedure) == {"parallel", "iterative"}
    diff = iterative_minus_parallel(earlier)
    assert diff[["kl", "logit_diff", "kl_after_latents", "answer_logit_diff"]].abs().max().max() <= 1e-6
    assert (earlier.kl == earlier.corrupted_kl).all()  # (b): the question positions never see the patch
    iterative = earlier[earlier.procedure == "iterative"]
    assert (iterative.passes == iterative.n + 1).all() and (iterative.regen_vs_corrupted <= 1e-6).all()
    assert iterative_minus_parallel(rows["regenerated"])["answer_logit_diff"].abs().max() > 1e-4
    assert iterative_minus_parallel(rows["loop"])["answer_logit_diff"].abs().max() > 1e-4
    table = ablation_table(pd.concat(rows.values(), ignore_index=True)).set_index("step ablated")
    assert len(table) == 6
    earlier_row = table.loc["none: the earlier procedure"]
    assert earlier_row["max |it-par| kl"] <= 1e-6 and earlier_row["max |it-par| ld"] <= 1e-6 and earlier_row["mean |effect| kl"] == 0
    assert table["max |it-par| ld"].iloc[-1] > 1e-4  # every step ablated: the real strategies differ


def test_bad_input_is_refused(setup):
    _, model, _, _, _, _, _ = setup
    with pytest.raises(ValueError, match=r"layer 3 out of range: the model has layers 0\.\.2"):
        earlier_procedure(model, [PAIR], layers=[3])
    with pytest.raises(ValueError, match="repeat a layer"):
        earlier_procedure(model, [PAIR], layers=[1, 1])
    longer = Pair("long", CLEAN_Q, "Tom has 12345 apples and buys 5 more.", 8.0, 12347.0, NumberChange("3", "12345", (8, 9)))
    with pytest.raises(ValueError, match=r"pair 'long': its questions have different token lengths \(clean 12, corrupted 13\)"):
        earlier_procedure(model, [PAIR, longer], layers=[0])
    with pytest.raises(ValueError, match="no pairs"):
        earlier_procedure(model, [], layers=[0])
    with pytest.raises(ValueError, match="unknown variant 'pads'"):
        earlier_procedure(model, [PAIR], variant="pads")
