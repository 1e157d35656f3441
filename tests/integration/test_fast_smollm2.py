"""The batched engine against its batch of one on real SmolLM2-135M weights (a small sweep).

fp32 rounding differs between equivalent computation orders (a batched KV-cached continuation vs
one full pass); on this checkpoint that is ~1e-6 of the logits' scale, so the answer logits are
compared at 1e-5 of their largest magnitude (~3e-4 absolute at scale ~30), everything else at 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from interp.data import align
from interp.data.arithmetic import arithmetic_pairs
from interp.engine import BatchPatcher, Job
from interp.metrics import cache_similarity
from interp.patching import latent_sites, patch_sites
from interp.trace import similarity_positions, trace_pair

pytestmark = pytest.mark.slow

CASES = [
    ("blocks.0.hook_resid_post", None, (0,)),
    ("blocks.15.hook_resid_post", None, (3,)),
    ("blocks.29.hook_resid_post", None, (5,)),
    ("blocks.10.hook_resid_pre", None, (1, 2)),
    ("blocks.0.hook_resid_pre", None, (2,)),
    ("blocks.7.hook_attn_out", None, (0, 1, 2, 3, 4, 5)),
    ("blocks.20.hook_mlp_out", None, (4,)),
    ("blocks.12.attn.hook_z", 3, (2,)),
]


MAX_NEW = 6  # decode steps (the random-LoRA model never emits eos; the decode path is the same at any length)


@pytest.fixture(scope="module")
def traces(smol_codi):
    """Two aligned pairs whose questions tokenize to different lengths, traced."""
    _, model, _, _ = smol_codi
    pairs = [a.pair for a in align(arithmetic_pairs(12, steps=(3, 6), seed=7), model.tokenizer)]
    by_length = {len(model.tokenizer(p.corrupted_question)["input_ids"]): p for p in pairs}
    assert len(by_length) >= 2
    return [trace_pair(model, by_length[n]) for n in (min(by_length), max(by_length))]


@pytest.mark.parametrize("strategy", ["parallel", "iterative"])
def test_fast_matches_reference_on_smollm2(smol_codi, traces, strategy):
    _, model, _, _ = smol_codi
    assert traces[0].corrupted.latent_positions[0] != traces[1].corrupted.latent_positions[0]
    positions = [similarity_positions(pt.corrupted)[0] for pt in traces]
    jobs = [Job((latent_sites(pt.corrupted, hook, lat, head),), strategy, pair=i) for hook, head, lat in CASES for i, pt in enumerate(traces)]
    patcher = BatchPatcher(model, [(pt.corrupted, pt.clean) for pt in traces], capture="hook_resid_post", capture_positions=positions, batch_size=5, max_new_tokens=MAX_NEW)
    for job, fast in zip(jobs, patcher.run(jobs)):  # batches of 5 rows mix the two pairs
        pt = traces[job.pair]
        ref = patch_sites(model, pt.corrupted, pt.clean, job.sites, strategy, max_new_tokens=MAX_NEW)
        scale = float(ref.answer_logits.abs().max())
        assert (fast.answer_logits - ref.answer_logits).abs().max() < 1e-5 * scale, job
        assert (fast.next_logits - ref.next_logits).abs().max() < 1e-5 * scale, job
        assert (fast.latents.cpu() - ref.latents.cpu()).abs().max() < 1e-5 * float(ref.latents.abs().max()), job
        assert fast.generation.answer_ids.tolist() == ref.generation.answer_ids.tolist(), job
        a = cache_similarity(fast.cache, pt.clean.cache, "hook_resid_post", positions[job.pair])
        b = cache_similarity(ref.cache, pt.clean.cache, "hook_resid_post", positions[job.pair])
        assert (a["cos"] - b["cos"]).abs().max() < 1e-5 and (a["rel_l2"] - b["rel_l2"]).abs().max() < 1e-5, job


def test_fast_matches_reference_in_float64(smol_codi):
    """In float64 the two engines agree to rounding of float64: the algorithms are the same."""
    _, _, base_dir, ckpt = smol_codi
    from interp import load_codi

    model = load_codi(ckpt, base_dir, device="cpu", dtype=torch.float64)
    pair = [a.pair for a in align(arithmetic_pairs(4, seed=7), model.tokenizer)][0]
    pt = trace_pair(model, pair)
    c = pt.corrupted
    jobs = [Job((latent_sites(c, hook, lat, head),), s) for hook, head, lat in CASES[:3] for s in ("parallel", "iterative")]
    for job, fast in zip(jobs, BatchPatcher(model, [(c, pt.clean)], batch_size=8, max_new_tokens=MAX_NEW).run(jobs)):
        ref = patch_sites(model, c, pt.clean, job.sites, job.strategy, max_new_tokens=MAX_NEW)
        assert (fast.answer_logits - ref.answer_logits).abs().max() < 1e-9, job
        assert fast.generation.answer_ids.tolist() == ref.generation.answer_ids.tolist()
