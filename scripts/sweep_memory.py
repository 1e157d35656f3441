"""Peak memory of the SmolLM2 sweep (fast engine) as the number of pairs grows: results stream to
disk and at most `interp.sweep.MAX_GROUP_PAIRS` pairs' traces are held, so the peak stops growing.

    .venv/bin/python scripts/sweep_memory.py --pairs 4,20 --out /tmp/sweep_memory
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from benchmarks.models import bench_pairs, smollm2_codi
from interp.sweep import MAX_GROUP_PAIRS, SweepConfig, run_sweep
from interp.trace import trace_pair


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default="4,20", help="comma-separated pair counts, run in this order in one process")
    ap.add_argument("--layers", default="0,29")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = smollm2_codi(dtype=torch.float32, device="cpu")
    counts = [int(n) for n in args.pairs.split(",")]
    pairs = bench_pairs(model, max(counts))
    pt = trace_pair(model, pairs[0])
    trace_mb = sum(v.numel() * v.element_size() for t in (pt.clean, pt.corrupted) for v in t.cache.cache_dict.values()) / 1024**2
    print(f"model loaded, peak RSS {rss_gib():.2f} GiB; one pair's two traces hold {trace_mb:.1f} MiB of activations; MAX_GROUP_PAIRS {MAX_GROUP_PAIRS}")
    del pt
    config = SweepConfig(layers=tuple(int(x) for x in args.layers.split(",")), kinds=("single", "all"), bootstrap=200)
    for n in counts:
        t0 = time.perf_counter()
        summary = run_sweep(model, pairs[:n], f"{args.out}/n{n}", config, progress=False)
        print(f"{n} pairs: {summary['n_tests']} tests in {time.perf_counter() - t0:.0f} s; peak RSS so far {rss_gib():.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
