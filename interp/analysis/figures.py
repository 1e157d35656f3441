"""Plotly heatmaps of the analysis rows (data first: every figure is built from `analysis.json` rows)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def _layer_label(layer: Any) -> str:
    return "embed" if layer == -1 else str(layer)


def _grid(rows: Sequence[dict[str, Any]], y: str, x: str, z: str, hover: Sequence[str]) -> tuple[list, list, list, list]:
    """(y labels, x labels, z [y][x], hover text [y][x]) of rows keyed by their `y` and `x` fields, in first-seen order."""
    ys = list(dict.fromkeys(r[y] for r in rows))
    xs = list(dict.fromkeys(r[x] for r in rows))
    cell = {(r[y], r[x]): r for r in rows}
    zs = [[cell[a, b][z] if (a, b) in cell else math.nan for b in xs] for a in ys]
    text = [["<br>".join(_field(cell[a, b], k) for k in hover) if (a, b) in cell else "" for b in xs] for a in ys]
    return ys, xs, zs, text


def _field(row: dict[str, Any], key: str) -> str:
    return f"{key} {row[key]:.3g}" if isinstance(row[key], float) else f"{key} {row[key]}"


def _by(rows: Sequence[dict[str, Any]], field: str) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r[field], []).append(r)
    return out


def _panels(
    groups: dict[Any, list[dict[str, Any]]],
    y: str,
    x: str,
    z: str,
    hover: Sequence[str],
    title: str,
    zrange: tuple[float, float],
    titles: Sequence[str],
    ytitle: str,
    ylabel=str,
) -> go.Figure:
    """One heatmap panel per group (rows keyed by `y` and `x`, colour `z`), on one colour scale."""
    ncols = min(4, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=list(titles), horizontal_spacing=0.05, vertical_spacing=0.12)
    height = 0
    for i, rows in enumerate(groups.values()):
        ys, xs, zs, text = _grid(rows, y, x, z, hover)
        fig.add_trace(
            go.Heatmap(
                z=zs,
                x=[str(v) for v in xs],
                y=[ylabel(v) for v in ys],
                zmin=zrange[0],
                zmax=zrange[1],
                colorscale="Viridis",
                showscale=i == 0,
                colorbar={"title": {"text": z}},
                customdata=text,
                hovertemplate="%{customdata}<extra></extra>",
                texttemplate="%{z:.2f}",
            ),
            row=i // ncols + 1,
            col=i % ncols + 1,
        )
        height = max(height, len(ys))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed" if ytitle == "query" else True)
    fig.update_yaxes(title_text=ytitle, col=1)
    fig.update_layout(title=title, height=140 + nrows * (80 + 32 * height))
    return fig


def lens_heatmap(rows: Sequence[dict[str, Any]], n: int) -> go.Figure:
    """One panel per target: layer (read out) x position, colour = top-1 rate of the target's token."""
    groups = _by(rows, "target")
    return _panels(
        groups,
        "layer",
        "position",
        "top1_rate",
        ("top1_rate", "mean_rank", "mean_prob", "n"),
        f"logit lens: how often the target value's token is the top token (n = {n} problems)",
        (0.0, 1.0),
        [f"target {t}" for t in groups],
        "layer read out",
        _layer_label,
    )


def probe_heatmap(rows: Sequence[dict[str, Any]], n: int) -> go.Figure:
    """One panel per target: layer x position, colour = held-out probe accuracy (hover: control, selectivity, majority)."""
    groups = _by(rows, "target")
    return _panels(
        groups,
        "layer",
        "position",
        "accuracy",
        ("accuracy", "control_accuracy", "selectivity", "majority", "n_test"),
        f"linear probes: held-out accuracy (n = {n} problems)",
        (0.0, 1.0),
        [f"target {t}" for t in groups],
        "layer read out",
        _layer_label,
    )


def attention_heatmap(rows: Sequence[dict[str, Any]], n: int) -> go.Figure:
    """One panel per layer: query x key group, colour = attention weight averaged over heads and problems."""
    heads: dict[tuple, list[float]] = {}
    for r in rows:
        heads.setdefault((r["layer"], r["query"], r["key"]), []).append(r["weight"])
    mean = [{"layer": layer, "query": q, "key": k, "weight": sum(w) / len(w), "heads": len(w)} for (layer, q, k), w in heads.items()]
    groups = _by(mean, "layer")
    return _panels(groups, "query", "key", "weight", ("weight", "heads"), f"attention weight, mean over heads (n = {n} problems)", (0.0, 1.0), [f"layer {layer}" for layer in groups], "query")


def knockout_heatmap(rows: Sequence[dict[str, Any]]) -> go.Figure:
    """Edge set x layer (`all` = every layer at once), colour = accuracy with those edges cut."""
    n = rows[0]["n"] if rows else 0
    base = rows[0]["baseline_accuracy"] if rows else math.nan
    fig = _panels(
        {"all": list(rows)},
        "edge",
        "layer",
        "accuracy",
        ("accuracy", "baseline_accuracy", "changed", "n"),
        f"attention knockout: accuracy with the edges cut (unablated {base:.2f}, n = {n} problems)",
        (0.0, 1.0),
        ["edges cut"],
        "edges cut",
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="layer cut (all = every layer at once)")
    return fig
