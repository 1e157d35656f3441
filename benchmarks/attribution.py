"""`python -m benchmarks.attribution`: the full head x position x layer grid of one pair, by AtP
(`interp.attribution.attribute`, one forward and one backward pass through the latent loop) against
the exact patching engine (`interp.engine.BatchPatcher`, one patched run per site, batched).

The exact grid is not run in full: a random sample of sites (`--sample`, seeded) is patched exactly,
plus AtP's own top sites (`--top`) so that the largest effects are among those compared. Its time
per site is measured on all of them in one `BatchPatcher.run` (batched as a sweep batches them) and
scaled to the grid's size; the script says so in its output. Reported per strategy:

- AtP time for the whole grid (`attn.hook_z` of every layer and head at every position: the best of
  `--repeats` calls), exact time per site, the scaled exact time for the grid, and the ratio;
- Spearman's rank correlation of AtP and exact effects over the exactly patched sites, and the
  top-10 recall: the fraction of the exact top 10 (by |effect|, among the exactly patched sites) that
  are among AtP's top 10 there.

The metric is the logit difference at the answers' first differing token (no decoding: the exact
runs score the same metric; `decode=False`). Feedback sites are latent positions only (the engine
refuses others; AtP's feedback estimate is 0 at positions whose thought is not fed).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from benchmarks.models import MODELS, bench_pairs, build_model
from interp.attribution import attribute, exact_effects
from interp.trace import trace_pair


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def top_recall(est: pd.Series, exact: pd.Series, k: int = 10) -> float:
    k = min(k, len(est))
    return len(set(est.abs().nlargest(k).index) & set(exact.abs().nlargest(k).index)) / k


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", choices=MODELS)
    parser.add_argument("--strategies", default="parallel,iterative", help="comma-separated: parallel, iterative, feedback")
    parser.add_argument("--hooks", default="z", help="AtP hook families of the grid (default z: every head of every layer)")
    parser.add_argument("--sample", type=int, default=96, help="random sites patched exactly")
    parser.add_argument("--top", type=int, default=16, help="AtP's top sites also patched exactly")
    parser.add_argument("--repeats", type=int, default=2, help="AtP calls timed (the best is reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = build_model(args.model, dtype=torch.float32, device="cpu")
    pt = trace_pair(model, bench_pairs(model, 1, seed=args.seed)[0])
    cfg, lay = model.cfg, pt.corrupted.layout
    print(f"model {args.model}: {cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}, {model.num_latents} latents; pair {pt.pair.id}: {lay.seq_len} positions; {args.threads} thread(s)")
    for strategy in args.strategies.split(","):
        seconds, df = timed(lambda strategy=strategy: attribute(model, pt, args.hooks.split(","), strategy), args.repeats)
        grid = df if strategy != "feedback" else df[df.position.str.startswith("latent[")]
        n_grid = len(grid)
        rng = np.random.default_rng(args.seed)
        top = grid.estimate.abs().nlargest(args.top).index
        rest = grid.index.difference(top)
        sample = rng.choice(rest, size=min(args.sample, len(rest)), replace=False)
        rows = grid.loc[list(top) + list(sample)].copy()
        t0 = time.perf_counter()
        rows["exact"] = exact_effects(model, pt, rows, strategy)
        exact_seconds = time.perf_counter() - t0
        per_site = exact_seconds / len(rows)
        scaled = per_site * n_grid
        rand = rows.loc[sample]
        print(f"\n{strategy}: grid of {n_grid} sites ({args.hooks} x {lay.seq_len if strategy != 'feedback' else lay.num_latents} positions)")
        print(f"  AtP, whole grid:        {seconds:8.2f} s  (best of {args.repeats})")
        print(f"  exact, per site:        {per_site * 1e3:8.1f} ms  (measured on {len(rows)} sites: {args.top} AtP top + {len(sample)} random, one batched run, {exact_seconds:.1f} s)")
        print(f"  exact, whole grid:      {scaled:8.1f} s  (scaled from the sample, not run)")
        print(f"  speed-up AtP vs exact:  {scaled / seconds:8.0f}x")
        print(f"  Spearman AtP vs exact:  {spearman(rows.estimate, rows.exact):8.3f}  over all {len(rows)} patched sites; {spearman(rand.estimate, rand.exact):.3f} over the {len(rand)} random ones")
        print(f"  top-10 recall:          {top_recall(rows.estimate, rows.exact):8.2f}  (exact top 10 among the patched sites found in AtP's top 10 there)")
        print(f"  largest |exact| {rows.exact.abs().max():.3g}; largest |AtP| {rows.estimate.abs().max():.3g}")


if __name__ == "__main__":
    main()
