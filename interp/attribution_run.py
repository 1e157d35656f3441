"""`interp patch --method atp|atp+verify`: attribution patching over a pairs file, into a run directory.

For every pair and strategy, `interp.attribute` estimates every site of the chosen hook families at
once (`attribution.jsonl`, one row per site: pair_id, strategy, hook, layer, position, head,
estimate); with `atp+verify` each pair's top-K sites by |estimate| are also patched exactly
(`interp.verify_top_k`), with as many random other sites (so that the recall can miss), their rows
carrying `exact`. A pair's rows are appended whole, each once,
so an interrupted run resumes where it stopped; the directory is a run directory like a sweep's
(`run.json` fingerprint, lock, `--force-new`). `summary.json` holds, per strategy, the number of
sites and, when verified, Spearman's rank correlation of AtP and exact over the verified sites, the
top-K recall (of a pair's verified sites, the exact top K found in the AtP top K, averaged over pairs), and the
"unconfirmed" sites: ranked in a pair's AtP top K but with an exact effect of the other sign or
under half the estimate. `report.html` draws AtP and exact side by side.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from interp.attribution import attribute, verify_top_k
from interp.data.pairs import Pair
from interp.engine import STRATEGIES
from interp.model import LatentModel
from interp.report import STYLE, model_line
from interp.runio import ATTRIBUTION, JsonlAppender, finite, model_fingerprint, open_run, pairs_sha256, read_jsonl, versions
from interp.sweep import ConfigError, check_pairs
from interp.trace import trace_pair

METHODS = ("exact", "atp", "atp+verify")


@dataclass(frozen=True)
class AttributionConfig:
    """What an attribution run estimates: hook families (as `interp.attribute` takes them), strategies,
    the metric, and `top_k` sites per pair and strategy patched exactly (0: none, `--method atp`)."""

    hooks: tuple[str, ...] = ("resid_post",)
    strategies: tuple[str, ...] = STRATEGIES
    metric: str = "logit_diff"
    top_k: int = 0


def _rows(pair: Pair, strategy: str, df: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of one pair and strategy, each with its `row_id` and plain JSON values."""
    out = []
    for r in df.to_dict("records"):
        head = None if pd.isna(r["head"]) else int(r["head"])
        layer = None if pd.isna(r["layer"]) else int(r["layer"])
        row = {"pair_id": pair.id, "strategy": strategy, "hook": r["hook"], "layer": layer, "position": r["position"], "head": head, "estimate": float(r["estimate"])}
        if "exact" in r:
            row["exact"] = None if pd.isna(r["exact"]) else float(r["exact"])
        row["row_id"] = f"{pair.id}|{strategy}|{r['hook']}|{r['position']}|{head}"
        out.append(row)
    return out


def run_attribution(
    model: LatentModel,
    pairs: Sequence[Pair],
    out_dir: str | Path,
    config: AttributionConfig | None = None,
    *,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
    force_new: bool = False,
) -> dict[str, Any]:
    """Run (or resume) attribution patching of every pair into `out_dir`; returns the summary."""
    config = config or AttributionConfig()
    bad = [s for s in config.strategies if s not in STRATEGIES]
    if bad or not config.strategies:
        raise ConfigError("strategies", f"accepted: one or more of {','.join(STRATEGIES)}", ",".join(config.strategies))
    if config.top_k < 0:
        raise ConfigError("top_k", "accepted: 0 or more", str(config.top_k))
    check_pairs(model, pairs)
    fingerprint = {"model": model_fingerprint(model), "pairs": {"n": len(pairs), "sha256": pairs_sha256(pairs)}, "config": finite(asdict(config)), "versions": versions()}
    info = {"method": "atp+verify" if config.top_k else "atp", "config": asdict(config), "pair_ids": [p.id for p in pairs], "provenance": finite(provenance or {})}
    with open_run(out_dir, fingerprint, info, force_new=force_new) as run:
        appender = JsonlAppender(run.path / ATTRIBUTION, "row_id")
        done = {row_id.split("|", 1)[0] for row_id in appender.keys}
        for pair in tqdm([p for p in pairs if p.id not in done], desc="attribution", disable=not progress):
            pt = trace_pair(model, pair)
            rows = []
            for strategy in config.strategies:
                df = attribute(model, pt, list(config.hooks), strategy, metric=config.metric)
                if config.top_k:
                    verified = verify_top_k(model, pt, df, config.top_k, extra=config.top_k, seed=verify_seed(pair)).table  # + as many random sites, so the recall can miss
                    df = df.merge(verified[["hook", "position", "head", "exact"]], on=["hook", "position", "head"], how="left")
                rows += _rows(pair, strategy, df)
            appender.append(rows)  # a pair's rows land whole or not at all
        summary = summarize_attribution(read_jsonl(run.path / ATTRIBUTION), config)
        run.finish(summary)
        write_attribution_report(run.path)
    return summary


def verify_seed(pair: Pair) -> int:
    """A seed of the random verified sites that depends on the pair only (resumed runs draw the same)."""
    return int(pairs_sha256([pair])[:8], 16)


def unconfirmed(row: dict[str, Any]) -> bool:
    """A verified site whose exact effect has the other sign than its estimate, or under half its size."""
    exact, estimate = row.get("exact"), row["estimate"]
    return exact is not None and (exact * estimate < 0 or abs(exact) < 0.5 * abs(estimate))


def summarize_attribution(rows: list[dict[str, Any]], config: AttributionConfig) -> dict[str, Any]:
    """Per strategy: sites, pairs and, for verified runs, Spearman (AtP vs exact over verified sites),
    mean top-K recall over pairs, and the unconfirmed sites."""
    df = pd.DataFrame(rows)
    out: dict[str, Any] = {"config": asdict(config), "strategies": {}}
    for strategy, part in df.groupby("strategy", sort=False):
        entry: dict[str, Any] = {"sites": int(len(part)), "pairs": int(part["pair_id"].nunique())}
        if "exact" in part and part["exact"].notna().any():
            v = part.dropna(subset=["exact"])
            entry["verified"] = int(len(v))
            entry["spearman"] = float(spearmanr(v["estimate"], v["exact"]).statistic) if len(v) > 1 else None
            recalls = []
            for _, p in v.groupby("pair_id"):
                k = min(config.top_k, len(p))
                recalls.append(len(set(p["exact"].abs().nlargest(k).index) & set(p["estimate"].abs().nlargest(k).index)) / k)
            entry["top_k_recall"] = float(np.mean(recalls))
            entry["unconfirmed"] = [{k: r[k] for k in ("pair_id", "hook", "position", "head", "estimate", "exact")} for r in v.to_dict("records") if unconfirmed(r)]
        out["strategies"][strategy] = entry
    return finite(out)


def _flag_text(r: dict[str, Any]) -> str:
    return f"{r['pair_id']} head {r['head']}: AtP {r['estimate']:.3g}, exact {r['exact']:.3g}"


def attribution_figure(df: pd.DataFrame, strategy: str, hook_family: str) -> go.Figure:
    """Layer x position heatmaps of one strategy, summed over heads and averaged over pairs: AtP beside
    exact (verified sites only; blank elsewhere). Hover names the unconfirmed sites."""
    part = df[(df["strategy"] == strategy) & (df["hook"].str.endswith(hook_family))]
    positions = list(dict.fromkeys(part["position"]))
    layers = sorted({int(x) for x in part["layer"].dropna()})
    verified = "exact" in part and part["exact"].notna().any()
    fig = make_subplots(rows=1, cols=2 if verified else 1, subplot_titles=["AtP estimate"] + (["exact (verified sites)"] if verified else []), horizontal_spacing=0.08)
    per_site = part.groupby(["layer", "position", "pair_id"], sort=False)
    grids = []
    for column in ["estimate"] + (["exact"] if verified else []):
        grid = np.full((len(layers), len(positions)), math.nan)
        summed = per_site[column].sum(min_count=1).groupby(["layer", "position"]).mean()
        for (layer, position), value in summed.items():
            grid[layers.index(int(layer)), positions.index(position)] = value
        grids.append(grid)
    bound = max(float(np.nanmax(np.abs(g))) if np.isfinite(g).any() else 0.0 for g in grids) or 1.0  # one colour scale for both panels
    for col, grid in enumerate(grids, start=1):
        heatmap = go.Heatmap(z=grid, x=positions, y=layers, colorscale="RdBu", zmin=-bound, zmax=bound, showscale=col == 1, hovertemplate="layer %{y}, %{x}: %{z:.3g}<extra></extra>")
        fig.add_trace(heatmap, row=1, col=col)
    flagged = [r for r in part.to_dict("records") if unconfirmed(r)]
    if verified and flagged:
        fig.add_trace(
            go.Scatter(
                x=[r["position"] for r in flagged],
                y=[r["layer"] for r in flagged],
                mode="markers",
                marker={"symbol": "x", "color": "black", "size": 9},
                name="unconfirmed",
                hovertext=[_flag_text(r) for r in flagged],
            ),
            row=1,
            col=1,
        )
    fig.update_layout(title=f"{strategy}: {hook_family} (mean over pairs of the per-site sum over heads; exact: over the verified heads)", height=420, plot_bgcolor="white")
    return fig


def write_attribution_report(run_dir: str | Path) -> Path:
    """`run_dir/report.html`: the summary and, per strategy and hook family, AtP beside exact."""
    run_dir = Path(run_dir)
    import json

    run = json.loads((run_dir / "run.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {"strategies": {}}
    df = pd.DataFrame(read_jsonl(run_dir / ATTRIBUTION))
    families = sorted({h.split(".", 2)[-1] if h.startswith("blocks.") else h for h in df["hook"]}) if len(df) else []
    lines = []
    for strategy, s in summary["strategies"].items():
        text = f"{strategy}: {s['sites']} site estimates over {s['pairs']} pairs"
        if "verified" in s:
            text += f"; {s['verified']} verified exactly, Spearman {s['spearman']:.3f}, top-K recall {s['top_k_recall']:.2f}, {len(s['unconfirmed'])} unconfirmed (x in the figure)"
        lines.append(f"<li>{html.escape(text)}</li>")
    figs = [attribution_figure(df, strategy, family) for strategy in summary["strategies"] for family in families]
    divs = "".join(f'<div class="figure">{fig.to_html(full_html=False, include_plotlyjs=False)}</div>' for fig in figs)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>interp attribution: {html.escape(run_dir.name)}</title>
<style>{STYLE}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>Attribution patching: {html.escape(run_dir.name)}</h1>
<p>{html.escape(model_line(run.get("fingerprint", {}).get("model", {}).get("load_options", {})))}</p>
<p>Estimates of patching the clean activation into the corrupted run at every site, from one forward and one
backward pass per pair and strategy (interp.attribute), in {html.escape(run["config"]["metric"])}.
Unconfirmed: in a pair's AtP top K, but the exact effect has the other sign or is under half the estimate.</p>
<ul>{"".join(lines)}</ul>
{divs}
</body></html>
"""
    path = run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def check_method(method: str, top_k: int) -> None:
    """The CLI's --method and --top-k together: one line when they do not go together."""
    if method not in METHODS:
        raise ConfigError("method", f"accepted: {', '.join(METHODS)}", method)
    if method == "atp+verify" and top_k < 1:
        raise ConfigError("top_k", "atp+verify patches each pair's top K sites exactly; accepted: 1 or more", str(top_k))
    if method != "atp+verify" and top_k:
        raise ConfigError("top_k", f"applies to --method atp+verify only (got --method {method})", str(top_k))
