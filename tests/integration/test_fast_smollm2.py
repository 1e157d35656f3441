"""The fast engine against the reference engine on real SmolLM2-135M weights (a small sweep).

fp32 rounding differs between equivalent computation orders (a batched KV-cached continuation vs
one full pass); on this checkpoint that is ~1e-6 of the logits' scale, so the answer logits are
compared at 1e-5 of their largest magnitude (~3e-4 absolute at scale ~30), everything else at 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from interp.data.arithmetic import arithmetic_pairs
from interp.data import align
from interp.fast import Job, PairPatcher
from interp.metrics import cache_similarity
from interp.patching import latent_sites, run_patched
from interp.sweep import similarity_positions, trace_pair

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


@pytest.mark.parametrize("strategy", ["parallel", "iterative"])
def test_fast_matches_reference_on_smollm2(smol_codi, strategy):
    _, model, _, _ = smol_codi
    pairs = [a.pair for a in align(arithmetic_pairs(12, steps=(3, 6), seed=7), model.tokenizer)]
    traces, lengths = [], set()
    for pair in pairs:  # two pairs of different question lengths
        pt = trace_pair(model, pair)
        if pt.corrupted.seq_len not in lengths:
            lengths.add(pt.corrupted.seq_len)
            traces.append(pt)
        if len(traces) == 2:
            break
    assert len(lengths) == 2
    for pt in traces:
        c = pt.corrupted
        sim_pos, _ = similarity_positions(c)
        jobs = [Job((latent_sites(c, hook, lat, head),), strategy) for hook, head, lat in CASES]
        results = PairPatcher(model, c, pt.clean, capture="hook_resid_post", capture_positions=sim_pos, batch_size=5).run(jobs)
        for job, fast in zip(jobs, results):
            ref = run_patched(model, c, pt.clean, job.sites, strategy)
            scale = float(ref.answer_logits.abs().max())
            assert (fast.answer_logits - ref.answer_logits).abs().max() < 1e-5 * scale, job
            assert (fast.next_logits - ref.next_logits).abs().max() < 1e-5 * scale, job
            assert (fast.latents.cpu() - ref.latents.cpu()).abs().max() < 1e-5 * float(ref.latents.abs().max()), job
            assert fast.generation.answer_ids.tolist() == ref.generation.answer_ids.tolist(), job
            a = cache_similarity(fast.cache, pt.clean.cache, "hook_resid_post", sim_pos)
            b = cache_similarity(ref.cache, pt.clean.cache, "hook_resid_post", sim_pos)
            assert (a["cos"] - b["cos"]).abs().max() < 1e-5 and (a["rel_l2"] - b["rel_l2"]).abs().max() < 1e-5, job


def test_fast_matches_reference_in_float64(smol_codi):
    """In float64 the two engines agree to rounding of float64: the algorithms are the same."""
    _, _, base_dir, ckpt = smol_codi
    from interp import load_codi

    model = load_codi(ckpt, base_dir, device="cpu", dtype=torch.float64)
    pair = [a.pair for a in align(arithmetic_pairs(4, seed=7), model.tokenizer)][0]
    pt = trace_pair(model, pair)
    c = pt.corrupted
    jobs = [Job((latent_sites(c, hook, lat, head),), s) for hook, head, lat in CASES[:4] for s in ("parallel", "iterative")]
    for job, fast in zip(jobs, PairPatcher(model, c, pt.clean, batch_size=8).run(jobs)):
        ref = run_patched(model, c, pt.clean, job.sites, job.strategy)
        assert (fast.answer_logits - ref.answer_logits).abs().max() < 1e-9, job
        assert fast.generation.answer_ids.tolist() == ref.generation.answer_ids.tolist()
