"""The nnsight peer baseline (benchmarks/baselines.py) against tests/reference.py on the tiny Llama-3.2 and GPT-2 CODIs.

The reference recomputes every sequence in full with PyTorch forward hooks; the baseline runs nnsight
traces with a KV cache. Both must give the same latents, answer logits and greedy answers. The batched
baseline (`nnsight_patch_batched`, many tests as rows of one batch) must agree with the per-test one
row by row, and with the reference.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nnsight", reason="the nnsight baseline needs the bench extra: pip install -e '.[bench]'")

from benchmarks.baselines import NnsightCodi, PatchTest, hf_codi, nnsight_patch, nnsight_patch_batched
from tests.reference import _replace_output, reference_patch

TOL = 1e-4
MAX_NEW = 4
SITES = [(0, (0,)), (1, (2,)), (2, (5,)), (1, (0, 1, 2, 3, 4, 5)), (0, (1, 3))]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_codi):
    ref, base, tokenizer, _ = tiny_codi
    v = base.config.vocab_size
    ids = {"bot": v + 1, "eot": v + 2, "eos": tokenizer.eos_token_id}
    clean_ids = tokenizer("7 +5 *3 -2 *7 +4 -1").input_ids
    corrupted_ids = tokenizer("7 +6 *3 -2 *7 +4 -1").input_ids
    assert len(clean_ids) == len(corrupted_ids)
    tail = tokenizer("The answer is:", add_special_tokens=False).input_ids
    codi = NnsightCodi(ref.codi, ref.prj, bot_id=ids["bot"], eot_id=ids["eot"], eos_id=ids["eos"])
    return ref, codi, ids, clean_ids, corrupted_ids, tail


def reference_run(ref, ids, question, tail):
    """(latents, answer ids, every layer's output [n_layers, seq, d], last logits) by full recompute."""
    latents, answer = ref.generate(question, bot=ids["bot"], eot=ids["eot"], eos=ids["eos"], num_latents=6, max_new_tokens=MAX_NEW)
    embeds = ref.sequence_embeds(question, latents, tail, bot=ids["bot"], eot=ids["eot"])
    with torch.no_grad():
        logits = ref.codi(inputs_embeds=embeds).logits[0, -1]
    return latents, answer, torch.stack(ref.layer_outputs(embeds)), logits


@torch.no_grad()
def reference_patched_answer(ref, ids, question, latents, layer, positions, values):
    """Greedy decode after eot with the patch hook on (full recompute per token)."""
    embeds = ref.sequence_embeds(question, latents, [], bot=ids["bot"], eot=ids["eot"])
    handle = _replace_output(ref.module("layer", layer), positions, values)
    answer: list[int] = []
    try:
        for _ in range(MAX_NEW):
            answer.append(int(ref.codi(inputs_embeds=embeds).logits[0, -1, : ids["eot"]].argmax()))
            if answer[-1] == ids["eos"]:
                break
            embeds = torch.cat([embeds, ref.embed(answer[-1:])], dim=1)
    finally:
        handle.remove()
    return answer


def test_unpatched_run_matches_reference(setup):
    ref, codi, ids, clean_ids, _, tail = setup
    latents, answer, outputs, logits = reference_run(ref, ids, clean_ids, tail)
    run = codi.run(clean_ids, tail, max_new_tokens=MAX_NEW)
    assert float((run.latents - latents).abs().max()) < TOL
    assert float((run.layer_outputs - outputs).abs().max()) < TOL
    assert float((run.logits - logits).abs().max()) < TOL
    assert run.answer_ids == answer


@pytest.mark.parametrize("strategy", ["parallel", "iterative"])
def test_patch_matches_reference(setup, strategy):
    ref, codi, ids, clean_ids, corrupted_ids, tail = setup
    _, _, clean_outputs, _ = reference_run(ref, ids, clean_ids, tail)
    corrupted_latents, _, _, corrupted_logits = reference_run(ref, ids, corrupted_ids, tail)
    clean = codi.run(clean_ids, tail, max_new_tokens=MAX_NEW)
    corrupted = codi.run(corrupted_ids, tail, max_new_tokens=MAX_NEW)
    effects = []
    for layer, latents in SITES:
        positions = [len(corrupted_ids) + 1 + t for t in latents]
        want_logits, want_latents = reference_patch(
            ref,
            corrupted_ids,
            corrupted_latents,
            clean_outputs[layer],
            tail,
            module="layer",
            layer=layer,
            positions=positions,
            strategy=strategy,
            bot=ids["bot"],
            eot=ids["eot"],
        )
        got = nnsight_patch(codi, corrupted_ids, corrupted.latents, clean.layer_outputs[layer], tail, layer=layer, latents=latents, strategy=strategy, max_new_tokens=MAX_NEW)
        assert float((got.logits - want_logits).abs().max()) < TOL, (layer, latents)
        assert float((got.latents - want_latents).abs().max()) < TOL, (layer, latents)
        want_answer = reference_patched_answer(ref, ids, corrupted_ids, want_latents, layer, positions, clean_outputs[layer][positions])
        assert got.answer_ids == want_answer, (layer, latents)
        effects.append(float((got.logits - corrupted_logits).abs().max()))
    assert max(effects) > 1e-3  # the patches are not no-ops


def test_gpt2(tiny_gpt2_codi):
    """GPT-2 CODI (Conv1D LoRA, learned positions) loaded from its checkpoint file by `hf_codi`."""
    ref, base, tokenizer, paths = tiny_gpt2_codi
    codi = NnsightCodi.from_checkpoint(torch.load(paths["bin"], weights_only=True), base, tokenizer)
    ids = {"bot": codi.bot_id, "eot": codi.eot_id, "eos": codi.eos_id}
    clean_ids, corrupted_ids = tokenizer("7 +5 *3 -2").input_ids, tokenizer("7 +6 *3 -2").input_ids
    assert len(clean_ids) == len(corrupted_ids)
    tail = tokenizer(" The answer is:").input_ids
    latents, answer, outputs, logits = reference_run(ref, ids, clean_ids, tail)
    clean = codi.run(clean_ids, tail, max_new_tokens=MAX_NEW)
    assert float((clean.latents - latents).abs().max()) < TOL
    assert float((clean.logits - logits).abs().max()) < TOL
    assert clean.answer_ids == answer
    corrupted = codi.run(corrupted_ids, tail, max_new_tokens=MAX_NEW)
    for strategy in ("parallel", "iterative"):
        for layer, patched in [(0, (0,)), (2, (3,)), (1, (0, 1, 2, 3, 4, 5))]:
            positions = [len(corrupted_ids) + 1 + t for t in patched]
            want_logits, want_latents = reference_patch(
                ref,
                corrupted_ids,
                corrupted.latents,
                outputs[layer],
                tail,
                module="layer",
                layer=layer,
                positions=positions,
                strategy=strategy,
                bot=ids["bot"],
                eot=ids["eot"],
            )
            got = nnsight_patch(codi, corrupted_ids, corrupted.latents, clean.layer_outputs[layer], tail, layer=layer, latents=patched, strategy=strategy)
            assert float((got.logits - want_logits).abs().max()) < TOL, (strategy, layer, patched)
            assert float((got.latents - want_latents).abs().max()) < TOL, (strategy, layer, patched)


def test_nothing_patched_and_all_patched(setup):
    """Patching no latent reproduces the corrupted run; every latent at layer 0, iteratively, the clean latents."""
    _, codi, _, clean_ids, corrupted_ids, tail = setup
    clean = codi.run(clean_ids, tail, max_new_tokens=MAX_NEW)
    corrupted = codi.run(corrupted_ids, tail, max_new_tokens=MAX_NEW)
    for strategy in ("parallel", "iterative"):
        none = nnsight_patch(codi, corrupted_ids, corrupted.latents, clean.layer_outputs[0], tail, layer=0, latents=(), strategy=strategy, max_new_tokens=MAX_NEW)
        assert float((none.logits - corrupted.logits).abs().max()) < TOL
        assert none.answer_ids == corrupted.answer_ids
    last = codi.n_layers - 1
    every = nnsight_patch(codi, corrupted_ids, corrupted.latents, clean.layer_outputs[last], tail, layer=last, latents=range(6), strategy="iterative")
    assert float((every.latents[1:] - clean.latents[1:]).abs().max()) < TOL  # latent t+1 = prj(final state at t), now clean


def test_hf_codi_loads_checkpoints(setup, tiny_codi):
    _, codi, ids, clean_ids, _, tail = setup
    _, base, tokenizer, paths = tiny_codi
    want = codi.run(clean_ids, tail, max_new_tokens=MAX_NEW)
    from safetensors.torch import load_file

    for state in (torch.load(paths["bin"], weights_only=True), load_file(str(paths["safetensors"]))):
        codi = NnsightCodi.from_checkpoint(state, base, tokenizer)
        assert (codi.bot_id, codi.eot_id, codi.eos_id) == (ids["bot"], ids["eot"], ids["eos"])
        got = codi.run(clean_ids, tail, max_new_tokens=MAX_NEW)
        assert float((got.logits - want.logits).abs().max()) < TOL
        assert got.answer_ids == want.answer_ids
    with pytest.raises(ValueError, match="does not fit"):
        hf_codi({**state, "codi.base_model.model.model.extra.weight": torch.zeros(1)}, base)


def test_errors(setup):
    _, codi, _, clean_ids, corrupted_ids, tail = setup
    run = codi.run(clean_ids, tail, max_new_tokens=1)
    with pytest.raises(ValueError, match="unknown strategy"):
        nnsight_patch(codi, corrupted_ids, run.latents, run.layer_outputs[0], tail, layer=0, latents=(0,), strategy="both")
    with pytest.raises(ValueError, match="out of range"):
        nnsight_patch(codi, corrupted_ids, run.latents, run.layer_outputs[0], tail, layer=9, latents=(0,), strategy="parallel")
    with pytest.raises(ValueError, match="out of range"):
        nnsight_patch(codi, corrupted_ids, run.latents, run.layer_outputs[0], tail, layer=0, latents=(6,), strategy="parallel")


# ----------------------------------------------------------------------------- the batched peer

#: a batch mixing layers and latent sets (single, several, all six), with two identical tests
BATCH_SITES = [(0, (0,)), (2, (5,)), (1, (2,)), (1, (0, 1, 2, 3, 4, 5)), (0, (1, 3)), (2, (5,)), (2, (0, 1, 2, 3, 4, 5)), (0, ())]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def case(request, setup, tiny_gpt2_codi):
    """(codi, clean ids, corrupted ids, tail, question and tail of another token length) on the tiny Llama-3.2 or GPT-2 CODI."""
    if request.param == "llama":
        _, codi, _, clean_ids, corrupted_ids, tail = setup
        return codi, clean_ids, corrupted_ids, tail
    _, base, tokenizer, paths = tiny_gpt2_codi
    codi = NnsightCodi.from_checkpoint(torch.load(paths["bin"], weights_only=True), base, tokenizer)
    return codi, tokenizer("7 +5 *3 -2").input_ids, tokenizer("7 +6 *3 -2").input_ids, tokenizer(" The answer is:").input_ids


def batch_tests(codi, clean_ids, corrupted_ids, tail, sites):
    clean = codi.run(clean_ids, tail, max_new_tokens=MAX_NEW)
    corrupted = codi.run(corrupted_ids, tail, max_new_tokens=MAX_NEW)
    tests = [PatchTest(corrupted_ids, corrupted.latents, clean.layer_outputs[layer], tail, layer, latents) for layer, latents in sites]
    return tests, corrupted


def per_test(codi, test, strategy):
    return nnsight_patch(codi, test.corrupted_ids, test.corrupted_latents, test.clean_outputs, test.tail_ids, layer=test.layer, latents=test.latents, strategy=strategy, max_new_tokens=MAX_NEW)


def assert_rows_agree(codi, tests, got, strategy):
    assert len(got) == len(tests)
    for test, row in zip(tests, got):
        want = per_test(codi, test, strategy)
        where = (test.layer, tuple(test.latents))
        assert float((row.latents - want.latents).abs().max()) < TOL, where
        assert float((row.logits - want.logits).abs().max()) < TOL, where
        assert row.answer_ids == want.answer_ids, where


@pytest.mark.parametrize("strategy", ["parallel", "iterative"])
def test_batched_matches_per_test(case, strategy):
    codi, clean_ids, corrupted_ids, tail = case
    tests, corrupted = batch_tests(codi, clean_ids, corrupted_ids, tail, BATCH_SITES)
    got = nnsight_patch_batched(codi, tests, strategy=strategy, max_new_tokens=MAX_NEW)
    assert_rows_agree(codi, tests, got, strategy)
    effects = [float((row.logits - corrupted.logits).abs().max()) for row in got]
    assert max(effects) > 1e-3  # the patches are not no-ops: a row left unpatched would be caught
    assert effects[-1] < TOL  # the empty latent set is the corrupted run
    assert float((got[1].logits - got[5].logits).abs().max()) < TOL and got[1].answer_ids == got[5].answer_ids  # identical tests


def test_batched_detects_a_wrong_layer(case):
    """The comparison can fail: a row patched at another layer than its test's differs from the per-test run."""
    codi, clean_ids, corrupted_ids, tail = case
    tests, _ = batch_tests(codi, clean_ids, corrupted_ids, tail, [(0, (0, 1, 2, 3, 4, 5)), (2, (0, 1, 2, 3, 4, 5))])
    wrong = [tests[0], PatchTest(corrupted_ids, tests[1].corrupted_latents, tests[1].clean_outputs, tail, 1, tests[1].latents)]
    for strategy in ("parallel", "iterative"):
        got = nnsight_patch_batched(codi, wrong, strategy=strategy, max_new_tokens=MAX_NEW)
        assert float((got[0].logits - per_test(codi, tests[0], strategy).logits).abs().max()) < TOL
        assert float((got[1].logits - per_test(codi, tests[1], strategy).logits).abs().max()) > 1e-3


@pytest.mark.parametrize("strategy", ["parallel", "iterative"])
def test_batched_rows_of_different_lengths(case, strategy):
    """Questions and tails of different token lengths in one batch (left-padded prefix, right-padded tail)."""
    codi, clean_ids, corrupted_ids, tail = case
    short_clean, short_corrupted, short_tail = clean_ids[:-2], corrupted_ids[:-2], tail[:-1]
    long_tests, _ = batch_tests(codi, clean_ids, corrupted_ids, tail, [(0, (0,)), (2, (0, 1, 2, 3, 4, 5))])
    short_tests, _ = batch_tests(codi, short_clean, short_corrupted, short_tail, [(1, (2, 4)), (2, (0, 1, 2, 3, 4, 5)), (0, ())])
    tests = [short_tests[0], long_tests[0], short_tests[1], long_tests[1], short_tests[2]]
    assert len({len(t.corrupted_ids) for t in tests}) == 2 and len({len(t.tail_ids) for t in tests}) == 2
    got = nnsight_patch_batched(codi, tests, strategy=strategy, max_new_tokens=MAX_NEW)
    assert_rows_agree(codi, tests, got, strategy)


@pytest.mark.parametrize("strategy", ["parallel", "iterative"])
def test_batched_matches_reference(setup, strategy):
    ref, codi, ids, clean_ids, corrupted_ids, tail = setup
    _, _, clean_outputs, _ = reference_run(ref, ids, clean_ids, tail)
    corrupted_latents, _, _, _ = reference_run(ref, ids, corrupted_ids, tail)
    tests, _ = batch_tests(codi, clean_ids, corrupted_ids, tail, BATCH_SITES)
    got = nnsight_patch_batched(codi, tests, strategy=strategy, max_new_tokens=MAX_NEW)
    for (layer, latents), row in zip(BATCH_SITES, got):
        positions = [len(corrupted_ids) + 1 + t for t in latents]
        want_logits, want_latents = reference_patch(
            ref, corrupted_ids, corrupted_latents, clean_outputs[layer], tail, module="layer", layer=layer, positions=positions, strategy=strategy, bot=ids["bot"], eot=ids["eot"]
        )
        assert float((row.logits - want_logits).abs().max()) < TOL, (layer, latents)
        assert float((row.latents - want_latents).abs().max()) < TOL, (layer, latents)
        want_answer = reference_patched_answer(ref, ids, corrupted_ids, want_latents, layer, positions, clean_outputs[layer][positions])
        assert row.answer_ids == want_answer, (layer, latents)


def test_batched_errors(setup):
    _, codi, _, clean_ids, corrupted_ids, tail = setup
    run = codi.run(clean_ids, tail, max_new_tokens=1)
    ok = PatchTest(corrupted_ids, run.latents, run.layer_outputs[0], tail, 0, (0,))
    assert nnsight_patch_batched(codi, [], strategy="parallel") == []
    with pytest.raises(ValueError, match="unknown strategy"):
        nnsight_patch_batched(codi, [ok], strategy="both")
    with pytest.raises(ValueError, match="out of range"):
        nnsight_patch_batched(codi, [ok, PatchTest(corrupted_ids, run.latents, run.layer_outputs[0], tail, 9, (0,))], strategy="parallel")
    with pytest.raises(ValueError, match="out of range"):
        nnsight_patch_batched(codi, [PatchTest(corrupted_ids, run.latents, run.layer_outputs[0], tail, 0, (6,))], strategy="iterative")
    with pytest.raises(ValueError, match="same number of latents"):
        nnsight_patch_batched(codi, [ok, PatchTest(corrupted_ids, run.latents[:5], run.layer_outputs[0], tail, 0, (0,))], strategy="parallel")
