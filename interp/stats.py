"""Aggregation across pairs: bootstrap CIs per cell, paired differences, the verdict.

`summary.json` and the report's figures aggregate with the same function, `cell_stats`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from interp.runio import unique_rows
from interp.score import VALIDITY_TOL

METRICS = ("normalized_effect", "logit_diff", "kl", "flip")
#: a cell whose CI rests on fewer pairs than this is flagged
MIN_PAIRS = 10
CELL = ("strategy", "kind", "layer", "latents")


def bootstrap_ci(values: Sequence[float], n_resamples: int, seed: int) -> tuple[float, float, float, int]:
    """Mean and percentile-bootstrap 95% CI over pairs (NaNs dropped). CI is NaN when n < 2."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan, 0
    if len(x) < 2 or np.all(x == x[0]):
        return float(x.mean()), (math.nan if len(x) < 2 else float(x[0])), (math.nan if len(x) < 2 else float(x[0])), len(x)
    from scipy.stats import bootstrap

    res = bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=0.95, method="percentile", random_state=np.random.default_rng(seed))
    return float(x.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high), len(x)


def cell_stats(rows: pd.DataFrame, values: str, n_resamples: int, seed: int, by: Sequence[str]) -> pd.DataFrame:
    """Mean, bootstrap 95% CI and n of column `values` per group of `by` (booleans count as rates)."""
    out = []
    for key, group in rows.groupby(list(by), sort=True):
        mean, lo, hi, n = bootstrap_ci(group[values].astype(float).tolist(), n_resamples, seed)
        out.append({**dict(zip(by, key)), "mean": mean, "ci_low": lo, "ci_high": hi, "n": n})
    return pd.DataFrame(out, columns=[*by, "mean", "ci_low", "ci_high", "n"])


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df["latents"] = df["latents"].map(tuple)
    return df


def paired_differences(df: pd.DataFrame, a: str = "iterative", b: str = "parallel", metric: str = "normalized_effect") -> pd.DataFrame:
    """Per pair and (kind, layer, latents): metric under strategy a minus under strategy b."""
    keys = ["pair_id", "kind", "layer", "latents"]
    left = df[df["strategy"] == a].set_index(keys)[metric]
    right = df[df["strategy"] == b].set_index(keys)[metric]
    both = left.to_frame("a").join(right.to_frame("b"), how="inner")
    return (both["a"].astype(float) - both["b"].astype(float)).rename("diff").reset_index()


def summarize(rows: list[dict[str, Any]], validity: list[dict[str, Any]], config) -> dict[str, Any]:
    """Per-cell means with bootstrap CIs, paired iterative-minus-parallel differences, a verdict.

    A metric written as null (non-finite) is left out of its cell's n. Repeated test ids or validity
    pair ids (a file written by an older interp, or by two processes at once) count once, the first
    row, with a warning.
    """
    rows, repeated = unique_rows(rows, "test_id")
    validity, repeated_pairs = unique_rows(validity, "pair_id")
    if repeated or repeated_pairs:
        warnings.warn(f"{repeated} repeated test id(s) and {repeated_pairs} repeated validity pair id(s) ignored: each counts once (its first row)", stacklevel=2)
    failed = [{"pair_id": v["pair_id"], "failed": [k for k, c in v["checks"].items() if not c["passed"]]} for v in validity if not v["passed"]]
    summary: dict[str, Any] = {"hook": config.hook, "n_pairs": len({r["pair_id"] for r in rows}), "n_tests": len(rows)}
    cells, differences = [], []
    if rows:
        df = _frame(rows)
        per_metric = {m: cell_stats(df, m, config.bootstrap, config.seed, CELL).set_index(list(CELL)) for m in METRICS}
        hooks = df.groupby(list(CELL))["hook"].first()
        for key in per_metric[METRICS[0]].index:
            cell = {**dict(zip(CELL, key)), "latents": list(key[3]), "hook": hooks[key]}
            for m in METRICS:
                st = per_metric[m].loc[key]
                cell[m] = {"mean": st["mean"], "ci_low": st["ci_low"], "ci_high": st["ci_high"], "n": int(st["n"])}
            cells.append(cell)
        diffs = paired_differences(df)
        if len(diffs):
            st = cell_stats(diffs, "diff", config.bootstrap, config.seed, ("kind", "layer", "latents"))
            signature = diffs.groupby(["kind", "layer", "latents"])["diff"].apply(lambda s: tuple(np.round(s.to_numpy(dtype=float), 6)))
            for _, d in st.iterrows():
                key = (d["kind"], d["layer"], d["latents"])
                differences.append(
                    {
                        "kind": d["kind"],
                        "layer": int(d["layer"]),
                        "latents": list(d["latents"]),
                        "mean": d["mean"],
                        "ci_low": d["ci_low"],
                        "ci_high": d["ci_high"],
                        "n": int(d["n"]),
                        "ci_excludes_zero": bool(d["n"] >= 2 and (d["ci_low"] > 0 or d["ci_high"] < 0)),
                        "few_pairs": bool(d["n"] < MIN_PAIRS),
                        "signature": signature[key],
                    }
                )
    summary.update(
        {
            "cells": cells,
            "iterative_minus_parallel": [{k: v for k, v in d.items() if k != "signature"} for d in differences],
            "validity": {"n_pairs": len(validity), "n_failed": len(failed), "failed": failed, "tolerance": VALIDITY_TOL},
            "verdict": verdict(differences, failed),
        }
    )
    return summary


def verdict(differences: list[dict[str, Any]], failed: list[dict[str, Any]]) -> str:
    """A plain-language answer to: do iterative and parallel patching differ on this model?

    Cells of one latent set whose per-pair differences are identical across layers (to 1e-6) are
    one observation, not one per layer: they are counted once.
    """
    lines = []
    if failed:
        lines.append(f"WARNING: {len(failed)} pair(s) failed a validity check; their results are suspect.")
    tested = [d for d in differences if d["n"] >= 2]
    if not tested:
        return " ".join(lines + ["Too few pairs (fewer than 2) to tell whether iterative and parallel patching differ."])
    distinct: dict[tuple, dict[str, Any]] = {}
    for d in tested:  # one entry per (kind, latents, per-pair differences): identical layers collapse
        distinct.setdefault((d["kind"], tuple(d["latents"]), d.get("signature")), d)
    cells = list(distinct.values())
    sig = [d for d in cells if d["ci_excludes_zero"]]
    collapsed = len(tested) - len(cells)
    note = f" ({collapsed} layer cells identical to another layer's were counted once)" if collapsed else ""
    few = sum(d["n"] < MIN_PAIRS for d in cells)
    caution = f" {few} of these cells rest on fewer than {MIN_PAIRS} pairs: treat their CIs as rough." if few else ""
    if sig:
        biggest = max(sig, key=lambda d: abs(d["mean"]))
        lines.append(
            f"Iterative and parallel patching differ: in {len(sig)} of {len(cells)} distinct (layer, latent set) cells{note} the "
            f"95% CI of the paired difference in normalized effect excludes zero. Largest: {biggest['kind']} latents "
            f"{biggest['latents']} at layer {biggest['layer']}, iterative - parallel = {biggest['mean']:+.3f} "
            f"[{biggest['ci_low']:+.3f}, {biggest['ci_high']:+.3f}], n = {biggest['n']} pairs.{caution}"
        )
    else:
        lines.append(
            f"No detectable difference between iterative and parallel patching: in all {len(cells)} distinct cells{note} the 95% CI of "
            f"the paired difference in normalized effect includes zero.{caution}"
        )
    return " ".join(lines)
