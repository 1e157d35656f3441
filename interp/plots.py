"""Plotly figures from a sweep's results (see `interp.sweep` for the results.jsonl row schema).

Every figure is built from a results DataFrame (`load_results(run_dir)`): a cell is a
(strategy, layer, latent set) of one kind of test, its value the mean across pairs, with the
percentile-bootstrap 95% CI of `interp.stats.bootstrap_ci` (the function summary.json uses) in
the hover text. Layers are the model's real layer numbers; latent columns are named as the sweep
names positions (`latent[t]`).

    df = load_results("results/run1")
    heatmap(df, "normalized_effect", kind="single").show()
    difference_heatmap(df, kind="all").show()
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from interp.model import Generation, LatentModel, Trace
from interp.patching import STRATEGIES
from interp.runio import read_jsonl, unique_rows
from interp.stats import METRICS, cell_stats
from interp.stats import paired_differences as stats_paired_differences

SIMILARITIES = ("sim_cos", "sim_rel_l2", "par_cos", "par_rel_l2")
#: ranges a metric's colour scale always covers (None: the data decides that end)
METRIC_RANGES: dict[str, tuple[float | None, float | None]] = {
    "normalized_effect": (0.0, 1.0),
    "flip": (0.0, 1.0),
    "kl": (0.0, None),
    "logit_diff": (None, None),
}
STRATEGY_COLOURS = {"parallel": "#1f77b4", "iterative": "#d62728"}
N_RESAMPLES = 2000
#: a heatmap's cells: one per strategy, layer and latent-set column
GRID = ("strategy", "layer", "column")
#: cells whose bootstrap CI rests on fewer pairs than this are flagged (†) in the heatmaps
MIN_CI_PAIRS = 10


def load_results(run_dir: str | Path) -> pd.DataFrame:
    """results.jsonl of a run directory as a DataFrame, one row per patch test."""
    path = Path(run_dir) / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no results.jsonl in {run_dir}: is it a run directory written by interp.run_sweep?")
    rows, repeated = unique_rows(read_jsonl(path), "test_id")
    if not rows:
        raise ValueError(f"{path} holds no results yet")
    if repeated:
        warnings.warn(f"{path}: {repeated} repeated test id(s) ignored: each test is counted once (its first row)", stacklevel=2)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- cells


def column_of(kind: str, latents: Sequence[int]) -> int:
    """The heatmap column of a latent set: latent index (single), k (cumulative), 0 (all)."""
    if kind == "single":
        return int(latents[0])
    if kind == "cumulative":
        return len(latents)
    if kind == "all":
        return 0
    raise ValueError(f"unknown kind {kind!r}; use single, all or cumulative")


def column_label(kind: str, column: int) -> str:
    """`latent[t]` for single, `k=j` (the first j latents) for cumulative, `all latents` for all."""
    return {"single": f"latent[{column}]", "cumulative": f"k={column}", "all": "all latents"}[kind]


X_TITLES = {"single": "patched latent position", "cumulative": "first k latents patched", "all": "latents patched"}


def hook_family(df: pd.DataFrame) -> str:
    """The hook template of the rows (`blocks.{L}.hook_resid_post`)."""
    return ", ".join(sorted({re.sub(r"^blocks\.\d+\.", "blocks.{L}.", h) for h in df["hook"]}))


def select(df: pd.DataFrame, kind: str, strategy: str | None = None, latents: Sequence[int] | None = None) -> pd.DataFrame:
    """Rows of one kind (and strategy, latent set), with an integer `column`; raises if none match."""
    rows = df[df["kind"] == kind]
    if strategy is not None:
        rows = rows[rows["strategy"] == strategy]
    if latents is not None:
        rows = rows[rows["latents"].map(lambda x: list(x) == list(latents))]
    if rows.empty:
        have = sorted(set(zip(df["kind"], df["strategy"])))
        raise ValueError(f"no rows with kind={kind!r}, strategy={strategy!r}, latents={latents!r}; the results have (kind, strategy) {have}")
    rows = rows.copy()
    rows["column"] = [column_of(kind, lat) for lat in rows["latents"]]
    return rows


def _strategies(present: Sequence[str]) -> list[str]:
    present = set(present)
    return [s for s in STRATEGIES if s in present] + sorted(present - set(STRATEGIES))


def _colour_range(metric: str, means: Sequence[float]) -> tuple[float, float]:
    """(zmin, zmax) spanning the data and the metric's fixed range."""
    finite = [m for m in means if not math.isnan(m)]
    lo, hi = METRIC_RANGES.get(metric, (None, None))
    zmin = min(finite + ([lo] if lo is not None else [])) if finite or lo is not None else 0.0
    zmax = max(finite + ([hi] if hi is not None else [])) if finite or hi is not None else 1.0
    return (zmin, zmax) if zmax > zmin else (zmin - 0.5, zmax + 0.5)


def _hover(label: str, layer: int, mean: float, lo: float, hi: float, n: int) -> str:
    ci = "n/a (n < 2)" if math.isnan(lo) else f"[{lo:.3g}, {hi:.3g}]"
    few = f"† the CI rests on fewer than {MIN_CI_PAIRS} pairs<br>" if n < MIN_CI_PAIRS else ""
    return f"{few}layer {layer}, {label}<br>mean {mean:.4g}<br>95% CI {ci}<br>n = {n} pairs"


def _cell_text(stats: pd.DataFrame, layers: list[int], columns: list[int]) -> list[list[str]]:
    """The text of each cell: its mean, with † when its CI rests on fewer than MIN_CI_PAIRS pairs."""
    cells = {(int(r.layer), int(r.column)): r for r in stats.itertuples()}
    return [[f"{cells[layer, c].mean:.2f}" + ("†" if cells[layer, c].n < MIN_CI_PAIRS else "") if (layer, c) in cells else "" for c in columns] for layer in layers]


def _few_pairs_note(stats: pd.DataFrame) -> str:
    return f"; † = CI on fewer than {MIN_CI_PAIRS} pairs" if (stats["n"] < MIN_CI_PAIRS).any() else ""


def _grid(stats: pd.DataFrame, layers: list[int], columns: list[int], kind: str) -> tuple[list[list[float]], list[list[str]]]:
    """z [layer][column] of the cell means and the hover text of each cell (NaN / '' where no cell)."""
    cells = {(int(r.layer), int(r.column)): r for r in stats.itertuples()}
    z, hover = [], []
    for layer in layers:
        z.append([float(cells[layer, c].mean) if (layer, c) in cells else math.nan for c in columns])
        hover.append([_hover(column_label(kind, c), layer, cells[layer, c].mean, cells[layer, c].ci_low, cells[layer, c].ci_high, cells[layer, c].n) if (layer, c) in cells else "" for c in columns])
    return z, hover


def _n_pairs(rows: pd.DataFrame) -> int:
    return int(rows["pair_id"].nunique())


# ----------------------------------------------------------------------------- figures


def _strategy_panels(stats: pd.DataFrame, ys: list[int], kind: str, metric: str, row_name: str = "layer", named: bool = True) -> go.Figure:
    """One heatmap per strategy of `cell_stats` rows keyed by `layer` (the y axis, values `ys`) and `column`,
    on one colour scale; hover names the y value `row_name`; `named`: each trace named by its strategy."""
    strategies = _strategies(stats["strategy"].unique())
    columns = sorted(int(x) for x in stats["column"].unique())
    zmin, zmax = _colour_range(metric, stats["mean"].tolist())
    fig = make_subplots(rows=1, cols=len(strategies), subplot_titles=strategies, shared_yaxes=True, horizontal_spacing=0.05)
    for i, s in enumerate(strategies):
        at = stats[stats["strategy"] == s]
        z, hover = _grid(at, ys, columns, kind)
        if row_name != "layer":
            hover = [[h.replace("layer ", f"{row_name} ", 1) for h in row] for row in hover]
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=[column_label(kind, c) for c in columns],
                y=ys,
                zmin=zmin,
                zmax=zmax,
                colorscale="Viridis",
                showscale=i == len(strategies) - 1,
                colorbar={"title": {"text": metric}},
                customdata=hover,
                hovertemplate="%{customdata}<extra>" + s + "</extra>",
                text=_cell_text(at, ys, columns),
                texttemplate="%{text}",
                name=s if named else None,
            ),
            row=1,
            col=i + 1,
        )
    fig.update_xaxes(title_text=X_TITLES[kind], type="category")
    fig.update_yaxes(type="category")
    return fig


def heatmap(df: pd.DataFrame, metric: str = "normalized_effect", strategy: str | None = None, kind: str = "single", *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> go.Figure:
    """Layer x latent heatmap of a metric's mean across pairs, one subplot per strategy.

    All subplots share one colour scale (same zmin/zmax). `flip` is shown as a rate. Hover: the
    mean, its bootstrap 95% CI and n pairs.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
    rows = select(df, kind, strategy)
    stats = cell_stats(rows, metric, n_resamples, seed, GRID)
    strategies = _strategies(stats["strategy"].unique())
    layers = sorted(int(x) for x in stats["layer"].unique())
    fig = _strategy_panels(stats, layers, kind, metric)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    shown = "rate" if metric == "flip" else "mean"
    fig.update_layout(
        title=f"{metric} ({shown}), {kind} patch: {' vs '.join(strategies)}; hook {hook_family(rows)}; n = {_n_pairs(rows)} pairs{_few_pairs_note(stats)}",
        height=160 + 45 * len(layers),
    )
    return fig


def paired_differences(df: pd.DataFrame, metric: str = "normalized_effect", kind: str = "single") -> pd.DataFrame:
    """Iterative minus parallel per pair and cell: columns pair_id, layer, column, diff."""
    rows = select(df, kind)
    if not {"iterative", "parallel"} <= set(rows["strategy"]):
        raise ValueError(f"{kind} tests need both strategies for a difference; the results have {sorted(rows['strategy'].unique())}")
    rows["latents"] = rows["latents"].map(tuple)
    out = stats_paired_differences(rows, "iterative", "parallel", metric)
    out["column"] = [column_of(kind, lat) for lat in out["latents"]]
    return out[["pair_id", "layer", "column", "diff"]]


def difference_heatmap(df: pd.DataFrame, metric: str = "normalized_effect", kind: str = "single", *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> go.Figure:
    """Iterative minus parallel, paired per pair: a diverging heatmap centred at zero.

    A cell's text carries `*` when the bootstrap 95% CI of the paired difference excludes zero
    (n >= 2, the rule of summary.json's `iterative_minus_parallel`).
    """
    diffs = paired_differences(df, metric, kind)
    stats = cell_stats(diffs, "diff", n_resamples, seed, by=("layer", "column"))
    stats["excludes_zero"] = (stats["n"] >= 2) & ((stats["ci_low"] > 0) | (stats["ci_high"] < 0))
    layers = sorted(int(x) for x in stats["layer"].unique())
    columns = sorted(int(x) for x in stats["column"].unique())
    z, hover = _grid(stats, layers, columns, kind)
    marked = {(int(r.layer), int(r.column)) for r in stats.itertuples() if r.excludes_zero}
    text = [[("" if math.isnan(v) else f"{v:+.2f}") + ("*" if (layer, c) in marked else "") for v, c in zip(zr, columns)] for zr, layer in zip(z, layers)]
    finite = [abs(v) for v in stats["mean"] if not math.isnan(v)]
    bound = max(finite) if finite and max(finite) > 0 else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[column_label(kind, c) for c in columns],
            y=layers,
            zmin=-bound,
            zmax=bound,
            zmid=0.0,
            colorscale="RdBu_r",
            colorbar={"title": {"text": f"Δ {metric}"}},
            text=text,
            texttemplate="%{text}",
            customdata=hover,
            hovertemplate="%{customdata}<extra>iterative − parallel</extra>",
        )
    )
    fig.update_xaxes(title_text=X_TITLES[kind], type="category")
    fig.update_yaxes(title_text="layer", type="category")
    fig.update_layout(
        title=f"iterative − parallel {metric}, {kind} patch (paired); hook {hook_family(df[df['kind'] == kind])}; n = {diffs['pair_id'].nunique()} pairs; * = 95% CI excludes 0",
        height=160 + 45 * len(layers),
    )
    return fig


def similarity_heatmap(
    df: pd.DataFrame,
    which: str = "sim_cos",
    strategy: str | None = None,
    kind: str = "single",
    latents: Sequence[int] = (0,),
    layers: Sequence[int] | None = None,
) -> go.Figure:
    """Activation similarity per (layer, position) of the patched run, averaged over pairs.

    `which`: `sim_cos` / `sim_rel_l2` compare the patched run with the clean run; `par_cos` /
    `par_rel_l2` compare the iterative run with the parallel one (iterative rows only). One
    subplot per patched layer in `layers` (default: every layer the sweep patched), all on one
    colour scale. Rows are the model's layers, columns the compared positions (`sim_positions`).
    """
    if which not in SIMILARITIES:
        raise ValueError(f"unknown similarity {which!r}; use one of {SIMILARITIES}")
    if which.startswith("par_"):
        if strategy not in (None, "iterative"):
            raise ValueError(f"{which} compares the iterative run with the parallel one; it exists on iterative rows only")
        strategy = "iterative"
    strategy = strategy or "parallel"
    rows = select(df, kind, strategy, latents)
    patched = sorted(int(x) for x in rows["layer"].unique()) if layers is None else list(layers)
    means = {}
    for layer in patched:
        at = rows[rows["layer"] == layer][which].dropna()
        if at.empty:
            raise ValueError(f"no {which} values for {strategy} {kind} latents {list(latents)} patched at layer {layer}")
        means[layer] = (np.nanmean(np.asarray(at.tolist(), dtype=float), axis=0), len(at))
    positions = list(rows["sim_positions"].iloc[0])
    finite = np.concatenate([m.ravel() for m, _ in means.values()])
    finite = finite[np.isfinite(finite)]
    if which.endswith("cos"):
        zmin, zmax, scale = (float(finite.min()) if finite.size else 0.0), 1.0, "Viridis"
    else:
        zmin, zmax, scale = 0.0, (float(finite.max()) if finite.size else 1.0), "Viridis_r"
    if zmax <= zmin:
        zmin, zmax = zmin - 0.5, zmax + 0.5
    ncols = min(4, len(patched))
    nrows = math.ceil(len(patched) / ncols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[f"patched at layer {layer}" for layer in patched], horizontal_spacing=0.06, vertical_spacing=0.12)
    for i, layer in enumerate(patched):
        mean, n = means[layer]
        model_layers = list(range(mean.shape[0]))
        hover = [[f"layer {lay}, {pos}<br>mean {mean[lay, j]:.4g}<br>n = {n} pairs" for j, pos in enumerate(positions)] for lay in model_layers]
        fig.add_trace(
            go.Heatmap(
                z=mean.tolist(),
                x=positions,
                y=model_layers,
                zmin=zmin,
                zmax=zmax,
                colorscale=scale,
                showscale=i == 0,
                colorbar={"title": {"text": which}},
                customdata=hover,
                hovertemplate="%{customdata}<extra></extra>",
            ),
            row=i // ncols + 1,
            col=i % ncols + 1,
        )
    fig.update_xaxes(type="category", title_text="position")
    fig.update_yaxes(type="category", title_text="layer read out")
    versus = "iterative vs parallel" if which.startswith("par_") else f"{strategy} patched vs clean"
    latent_names = ", ".join(f"latent[{t}]" for t in latents)
    fig.update_layout(
        title=f"{which}: {versus}, {kind} patch of {latent_names}; hook {hook_family(rows)}; n = {_n_pairs(rows)} pairs"
        "<br><sup>y axis: the layer read out, not the layer patched (each panel is one patched layer)</sup>",
        height=140 + nrows * (60 + 40 * len(means[patched[0]][0])),
    )
    return fig


def layer_lines(df: pd.DataFrame, metric: str = "normalized_effect", kind: str = "all", latents: Sequence[int] | None = None, *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> go.Figure:
    """Mean across pairs per layer with a bootstrap 95% CI band, one line per strategy.

    `kind` "all" has one latent set; for "single" or "cumulative" pass `latents`.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
    rows = select(df, kind, latents=latents)
    if rows["latents"].map(tuple).nunique() > 1:
        raise ValueError(f"{kind} tests patch several latent sets; pass latents=[...] to choose one")
    stats = cell_stats(rows, metric, n_resamples, seed, GRID)
    fig = go.Figure()
    for s in _strategies(stats["strategy"].unique()):
        st = stats[stats["strategy"] == s].sort_values("layer")
        colour = STRATEGY_COLOURS.get(s, "#555555")
        band = st.dropna(subset=["ci_low", "ci_high"])
        if not band.empty:
            fig.add_trace(
                go.Scatter(
                    x=band["layer"].tolist() + band["layer"].tolist()[::-1],
                    y=band["ci_high"].tolist() + band["ci_low"].tolist()[::-1],
                    mode="lines",
                    fill="toself",
                    fillcolor=colour,
                    opacity=0.2,
                    line={"width": 0},
                    hoverinfo="skip",
                    name=f"{s} 95% CI",
                    showlegend=False,
                )
            )
        hover = [_hover(column_label(kind, int(r.column)), int(r.layer), r.mean, r.ci_low, r.ci_high, int(r.n)) for r in st.itertuples()]
        fig.add_trace(go.Scatter(x=st["layer"], y=st["mean"], mode="lines+markers", name=s, line={"color": colour}, customdata=hover, hovertemplate="%{customdata}<extra>" + s + "</extra>"))
    which = "all latents" if kind == "all" else ", ".join(f"latent[{t}]" for t in rows["latents"].iloc[0])
    fig.update_xaxes(title_text="layer", tickmode="array", tickvals=sorted(stats["layer"].unique().tolist()))
    fig.update_yaxes(title_text=f"{metric} ({'rate' if metric == 'flip' else 'mean'})")
    fig.update_layout(title=f"{metric} per layer, {kind} patch of {which}; hook {hook_family(rows)}; n = {_n_pairs(rows)} pairs; bands: 95% CI", height=420)
    return fig


# ----------------------------------------------------------------------------- latent decoding


def logit_lens(model: LatentModel, trace: Trace) -> list[list[str]]:
    """Top token [layer][latent t] of `interp.analysis.lens.lens_logits` (unembed(ln_final(resid_post)), ids < decode_vocab) at each latent position."""
    from interp.analysis.lens import lens_logits

    resid = torch.stack([trace.cache[f"blocks.{layer}.hook_resid_post"][0, trace.latent_positions] for layer in range(model.cfg.n_layers)])
    return [[model.tokenizer.decode([int(i)]) for i in row] for row in lens_logits(model, resid).argmax(-1)]


def slot_heatmap(df: pd.DataFrame, metric: str = "normalized_effect", kind: str = "single", layer: int | None = None, *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> go.Figure:
    """Changed slot x patched latent set: the metric's mean over the pairs that changed that slot, one
    subplot per strategy, at one patched `layer` (default: the last one patched). Needs rows with
    `changed_slot` (sweeps since pairs carry it)."""
    rows = select(df, kind)
    if "changed_slot" not in rows or rows["changed_slot"].isna().all():
        raise ValueError("the rows carry no changed_slot (a sweep written before pairs carried it, or a source without slots)")
    layer = int(rows["layer"].max()) if layer is None else layer
    rows = rows[(rows["layer"] == layer) & rows["changed_slot"].notna()].copy()
    rows["slot"] = rows["changed_slot"].astype(int)
    stats = cell_stats(rows, metric, n_resamples, seed, ("strategy", "slot", "column"))
    stats = stats.rename(columns={"slot": "layer"})  # the grid helpers key rows by `layer`
    slots = sorted(int(x) for x in stats["layer"].unique())
    fig = _strategy_panels(stats, slots, kind, metric, row_name="changed slot", named=False)
    fig.update_yaxes(title_text="changed slot of the pair", row=1, col=1)
    fig.update_layout(
        title=f"{metric} by the number the pair changed, {kind} patch at layer {layer}; hook {hook_family(rows)}; n = {_n_pairs(rows)} pairs{_few_pairs_note(stats)}",
        height=160 + 45 * len(slots),
    )
    return fig


def latent_decoding_table(model: LatentModel, trace_or_generation: Trace | Generation, k: int = 3) -> go.Figure:
    """A table, one row per latent: the top-k tokens of its decoded state and of its fed embedding
    (`LatentModel.decode_latents`), and the logit lens's top token at each layer's resid_post."""
    if isinstance(trace_or_generation, Trace):
        trace = trace_or_generation
    else:
        gen = trace_or_generation
        trace = model.trace_from(model.tokenizer.decode(gen.question_ids, skip_special_tokens=True), gen, gen.latents, None)
    decoded = model.decode_latents(trace, k=k)
    lens = logit_lens(model, trace)

    def tops(pairs: list[tuple[str, float]]) -> str:
        return "<br>".join(f"{tok!r} {p:.2f}" for tok, p in pairs)

    header = ["latent", f"state top-{k}", f"embedding top-{k}"] + [f"lens L{layer}" for layer in range(model.cfg.n_layers)]
    columns = [
        [f"latent[{t}]" for t in range(len(decoded))],
        [tops(d["state"]) for d in decoded],
        [tops(d["embedding"]) for d in decoded],
    ] + [[repr(tok) for tok in lens[layer]] for layer in range(model.cfg.n_layers)]
    fig = go.Figure(go.Table(header={"values": header, "align": "left"}, cells={"values": columns, "align": "left"}))
    fig.update_layout(title=f"latent decoding: {trace.question!r} -> {trace.generation.text!r} (answer {trace.answer})", height=200 + 60 * len(decoded))
    return fig
