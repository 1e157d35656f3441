"""`python -m benchmarks.study_scale`: the original study's sweep timed at scale (benchmarks/gpu.sh runs it on a GPU).

The study: 57 pairs x 16 layers x 6 single latents x 2 strategies (parallel, iterative) = 10,944 patch
tests on `--model full-size` (random weights of exactly CODI-LLaMA-1B's shapes) in bfloat16. `python -m
benchmarks.bench` always runs its naive baseline over `--naive-tests` tests (0 means all of them), and
its ideal is a model-shaped matmul; this driver times, in one process, on one model and one set of traces:

0. the device's peak: a large matmul in the model's dtype (8192^3 on CUDA), and the nominal dense bf16
   spec when `torch.cuda.get_device_name()` is a known one (`NOMINAL_TFLOPS`),
1. the engine alone over every test (`benchmarks.bench.run_engine("fast", ...)`: one `BatchPatcher`
   over all pairs, batches in `batch_order`; scoring by `interp.score.unit_rows` timed apart), then its
   peak memory and fraction of peak: the needed FLOPs of its distinct runs (`benchmarks.bench.needed_flops`)
   over its patching time, against the measured, the nominal and a model-shaped matmul's FLOP/s,
2. the naive patcher and the one-at-a-time path (`interp.patch_sites`) on `--naive-tests` tests spread
   over the sweep (default 4: a naive test at full size recomputes the whole sequence for each of its
   ~38 steps), for the speed-up and the agreement of the scored-token logits,
3. `interp.sweep` end to end (lean traces, validity checks, engine, scoring), on as many pairs as the
   time left before `--deadline` allows (all of them when it allows).

The numbers a run must not lose (tests/s, memory, fraction of peak) are printed first, so that a run
cut short still has them. Every line is `key: value`; exit status 1 when the engine returned non-finite
logits or disagrees grossly (over `GROSS_REL_DIFF` of the largest logit) with the naive patcher.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import types
from collections.abc import Sequence
from importlib.util import find_spec

import torch

if find_spec("nnsight") is None and "benchmarks.baselines" not in sys.modules:
    # benchmarks/bench.py imports its nnsight baselines (the `bench` extra) at module level; this driver runs
    # none of them, so where nnsight is not installed (a bare GPU machine) a stand-in module takes their place:
    # any name imported from it is a callable that raises
    def _stand_in(name: str):
        if name.startswith("__"):  # __file__, __path__, ...: as a plain module has none
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise ImportError(f"benchmarks.baselines.{name} needs nnsight: pip install -e .[bench]")

        return missing

    _baselines = types.ModuleType("benchmarks.baselines", "stand-in: nnsight is not installed")
    _baselines.__getattr__ = _stand_in
    sys.modules["benchmarks.baselines"] = _baselines

from benchmarks.bench import DTYPES, compare_rows, matmul_flops_per_s, one_at_a_time, peak_memory, run_engine, sweep_patcher  # noqa: E402
from benchmarks.models import MODELS, bench_pairs, build_model  # noqa: E402
from benchmarks.naive import naive_patch  # noqa: E402
from interp.model import fast_layout  # noqa: E402
from interp.plan import Unit, latent_sets  # noqa: E402
from interp.sweep import SweepConfig, sweep  # noqa: E402
from interp.trace import trace_pair  # noqa: E402

__all__ = ["NOMINAL_TFLOPS", "compare_rows", "device_peak", "nominal_peak", "study_main"]

#: dense (no sparsity) tensor-core TFLOP/s in bfloat16, by a substring of `torch.cuda.get_device_name()`;
#: the first match wins, so the more specific names come first (vendor data sheets)
NOMINAL_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H100 NVL", 835.0, "H100 NVL"),
    ("H200 NVL", 835.0, "H200 NVL"),
    ("H100 PCIe", 756.0, "H100 PCIe"),
    ("H100", 989.0, "H100 SXM"),
    ("H200", 989.0, "H200 SXM"),
    ("B200", 2250.0, "B200"),
    ("A100", 312.0, "A100"),
    ("L40S", 362.0, "L40S"),
    ("L4", 121.0, "L4"),
)
#: engine vs naive scored-token logits, relative to the largest logit: above this, something is wrong
#: whatever the dtype (bfloat16 rounding differences between batched and single passes are ~1e-2)
GROSS_REL_DIFF = 0.25


def nominal_peak(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 TFLOP/s, which part) of a known device, else None."""
    name = device_name.lower()
    for key, tflops, what in NOMINAL_TFLOPS:
        if key.lower() in name:
            return tflops, what
    return None


def device_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, warmup: int = 3, repeats: int = 10) -> tuple[float, int]:
    """(FLOP/s, n) of an n x n x n `F.linear` in `dtype` on `device`: the mean of `repeats` products after `warmup`."""
    n = n or (8192 if device.type == "cuda" else 1024)
    x = torch.randn(n, n, device=device).to(dtype)
    w = torch.randn(n, n, device=device).to(dtype)
    for _ in range(warmup):
        torch.nn.functional.linear(x, w)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, w)
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0), n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.study_scale", description="The original study's sweep at scale: the engine alone, a few naive tests, interp.sweep end to end, and the device's peak."
    )
    p.add_argument("--model", choices=MODELS, default="full-size")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--pairs", type=int, default=57)
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    p.add_argument("--kinds", default="single")
    p.add_argument("--strategies", default="parallel,iterative")
    p.add_argument("--naive-tests", type=int, default=4, help="tests (spread over the sweep) run by the naive patcher and one at a time; 0: none")
    p.add_argument("--end-to-end", choices=("auto", "all", "none"), default="auto", help="interp.sweep end to end: on the pairs the time before --deadline allows (auto), on every pair, or not at all")
    p.add_argument("--deadline", type=float, default=None, help="a Unix time: with --end-to-end auto, the end-to-end sweep is cut to the pairs that fit before it")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default: from free memory)")
    p.add_argument("--matmul-n", type=int, default=None, help="side of the peak-measuring matmul (default 8192 on CUDA, 1024 on CPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def study_main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    config = SweepConfig(strategies=tuple(args.strategies.split(",")), kinds=tuple(args.kinds.split(",")), layers=layers, seed=args.seed)

    # the device's peak first (a second; its operands are freed before the peak memory counter is reset)
    measured, n = device_peak(device, dtype, args.matmul_n)
    nominal = nominal_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" and dtype == torch.bfloat16 else None
    print(f"device peak (measured): {measured / 1e12:.3f} TFLOP/s ({n}x{n}x{n} {args.dtype} matmul, mean of 10 after 3 warm-ups)")
    print(f"device peak (nominal): {nominal[0]:.0f} TFLOP/s ({nominal[1]} dense bf16, data sheet)" if nominal else "device peak (nominal): unknown for this device and dtype")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    model = build_model(args.model, dtype=dtype, device=str(device))
    fast_layout(model)
    load_s = time.perf_counter() - t0
    cfg = model.cfg
    n_layers = len(layers) if layers else cfg.n_layers
    n_sets = sum(len(latent_sets(k, model.num_latents)) for k in config.kinds)
    shape = f"{cfg.n_layers} layers, d_model {cfg.d_model}, heads {cfg.n_heads}/{cfg.n_key_value_heads}, d_mlp {cfg.d_mlp}, vocab {cfg.d_vocab}"
    print(f"model: {args.model}, {shape}, {args.dtype} on {device}; loaded in {load_s:.1f} s")
    print(
        f"sweep: {args.pairs} pairs x {n_layers} layers x {n_sets} latent sets ({','.join(config.kinds)}) x {len(config.strategies)} strategies ({','.join(config.strategies)}) "
        f"= {args.pairs * n_layers * n_sets * len(config.strategies)} tests, hook {config.hook}"
    )
    pairs = bench_pairs(model, args.pairs, args.seed)
    t0 = time.perf_counter()
    traces = [trace_pair(model, p) for p in pairs]
    trace_s = time.perf_counter() - t0
    print(f"traced: {len(traces)} pairs in {trace_s:.1f} s, sequence lengths {sorted({pt.corrupted.seq_len for pt in traces})}")

    # 1. the engine alone: its tests/s, memory and fraction of peak are printed before anything else runs
    fast_logits: dict[str, torch.Tensor] = {}
    fast, _ = run_engine("fast", model, traces, config, batch_size=args.batch_size, keep_logits=fast_logits, compare_logits=None, progress=False)
    batch = sweep_patcher(model, traces, config, args.batch_size).batch_size
    non_finite = sum(not bool(torch.isfinite(v).all()) for v in fast_logits.values())
    achieved = fast.flops / fast.patch_seconds
    print(
        f"engine: {fast.tests} tests ({fast.runs} distinct runs) in {fast.seconds:.2f} s = {fast.tests / fast.seconds:.2f} tests/s "
        f"(patching {fast.patch_seconds:.2f} s = {fast.tests / fast.patch_seconds:.2f} tests/s, scoring {fast.seconds - fast.patch_seconds:.2f} s); batch size {batch} units"
    )
    print(f"engine needed FLOPs: {fast.flops / 1e12:.3f} TFLOP ({fast.flops / fast.runs / 1e9:.3f} GFLOP/run), achieved {achieved / 1e12:.3f} TFLOP/s while patching")
    print(f"non-finite scored-token logits: {non_finite} of {len(fast_logits)} tests")
    print(f"peak memory: {_memory(device)} (model, traces and the engine)")
    of_nominal = f", {100 * achieved / (nominal[0] * 1e12):.3f}% of nominal" if nominal else ""
    shaped = matmul_flops_per_s(model)
    print(f"fraction of peak: {100 * achieved / measured:.3f}% of measured{of_nominal}, {100 * achieved / shaped:.3f}% of a model-shaped matmul ({shaped / 1e12:.3f} TFLOP/s, bench's ideal)")

    # 2. naive and one at a time on a few tests
    gross = False
    scale = max(float(pt.corrupted.next_logits.float().abs().max()) for pt in traces)
    if args.naive_tests:
        every = [Unit(pi, layer, kind, lat) for pi in range(len(traces)) for layer in (layers or range(cfg.n_layers)) for kind in config.kinds for lat in latent_sets(kind, model.num_latents)]
        n_units = max(1, min(len(every), round(args.naive_tests / len(config.strategies))))
        only = {every[round(i * (len(every) - 1) / max(1, n_units - 1))] for i in range(n_units)}
        naive_fn = lambda model, pt, site, strategy, family: naive_patch(model, pt.corrupted, pt.clean, [site], strategy, family=family)  # noqa: E731
        for name, fn in (("naive", naive_fn), ("one-at-a-time", one_at_a_time)):
            run, diff = run_engine(name, model, traces, config, batch_size=None, keep_logits=None, compare_logits=fast_logits, progress=False, only=only, patch_one=fn)
            rate = run.tests / run.seconds
            print(f"{name}: {run.tests} tests in {run.seconds:.2f} s = {rate:.3f} tests/s; engine speedup {fast.tests / fast.seconds / rate:.1f}x")
            print(f"{name} agreement: scored-token logits max abs diff {diff:.3e} = {diff / scale:.2e} of the largest logit ({scale:.2f})")
            gross |= not diff / scale < GROSS_REL_DIFF  # NaN counts as gross
    else:
        print("naive: not run (--naive-tests 0)")

    # 3. interp.sweep end to end
    if args.end_to_end != "none":
        n_e2e = len(pairs)
        if args.end_to_end == "auto" and args.deadline is not None:
            per_pair = 1.3 * (trace_s + fast.seconds) / len(pairs)  # its own traces, engine and scoring; validity checks ~30% more
            n_e2e = min(len(pairs), max(0, int((args.deadline - time.time() - 30) / per_pair)))
        if n_e2e:
            log = io.StringIO()  # tqdm.write's validity messages (expected in bfloat16: checks are at 1e-3)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(log):
                df = sweep(model, pairs[:n_e2e], config, progress=False, batch_size=args.batch_size)
            e2e_s = time.perf_counter() - t0
            failed = sum(not r["passed"] for r in df.attrs["validity"])
            common = [r for r in df.itertuples() if r.test_id in fast.rows]
            ld = max((abs(r.logit_diff - fast.rows[r.test_id]["logit_diff"]) for r in common), default=float("nan"))
            scope = "every pair" if n_e2e == len(pairs) else f"the first {n_e2e} of {len(pairs)} pairs (time left before the deadline)"
            print(f"interp.sweep end to end: {len(df)} tests on {scope} in {e2e_s:.2f} s = {len(df) / e2e_s:.2f} tests/s (tracing, validity checks, engine, scoring)")
            checked = len(df.attrs["validity"])
            print(f"interp.sweep vs the engine run above: logit_diff max abs diff {ld:.3e} over {len(common)} tests; validity checks failed on {failed} of {checked} pairs (at 1e-3)")
            print(f"peak memory after interp.sweep: {_memory(device)}")
        else:
            print("interp.sweep end to end: skipped (no time left before the deadline)")

    if non_finite or gross:
        print(f"CHECK FAILED: {non_finite} tests with non-finite logits; engine vs naive {'differs grossly' if gross else 'agrees'} (limit {GROSS_REL_DIFF} of the largest logit)")
        return 1
    compared = ", engine agrees with the naive patcher and the one-at-a-time path" if args.naive_tests else ""
    print(f"checks: engine logits finite{compared} (within {GROSS_REL_DIFF} of the largest logit)")
    return 0


def _memory(device: torch.device) -> str:
    reserved = f", peak CUDA reserved {torch.cuda.max_memory_reserved(device) / 1024**3:.2f} GiB" if device.type == "cuda" else ""
    return peak_memory(device) + reserved


if __name__ == "__main__":
    sys.exit(study_main(sys.argv[1:]))
