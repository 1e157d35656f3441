"""interp.plots: figure data checked against independent pandas/numpy computations on constructed results."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from interp.plan import latent_sets
from interp.plots import difference_heatmap, heatmap, latent_decoding_table, layer_lines, load_results, select, similarity_heatmap
from interp.stats import summarize
from interp.sweep import SweepConfig

LAYERS = (0, 2, 5)  # patched layers of a 6-layer model: real layer numbers, not 0..2
N_MODEL_LAYERS = 6
K = 3
SIM_POSITIONS = [f"latent[{t}]" for t in range(K)] + ["eot", "answer"]


def make_rows(n_pairs: int = 4, layers=LAYERS, k: int = K, seed: int = 0) -> list[dict]:
    """Results rows in the sweep's schema (interp/sweep.py) with random values, both strategies."""
    rng = random.Random(seed)

    def matrix(lo: float, hi: float) -> list[list[float]]:
        return [[rng.uniform(lo, hi) for _ in SIM_POSITIONS] for _ in range(N_MODEL_LAYERS)]

    rows = []
    for p in range(n_pairs):
        for layer in layers:
            for kind in ("single", "all", "cumulative"):
                for lat in latent_sets(kind, k):
                    for strategy in ("parallel", "iterative"):
                        hook = f"blocks.{layer}.hook_resid_post"
                        row = {
                            "test_id": f"p{p}|{hook}|{kind}|{','.join(map(str, lat))}|{strategy}",
                            "pair_id": f"p{p}",
                            "hook": hook,
                            "layer": layer,
                            "kind": kind,
                            "latents": list(lat),
                            "k": len(lat),
                            "position": f"latent[{lat[0]}]" if kind == "single" else None,
                            "strategy": strategy,
                            "logit_diff": rng.gauss(0, 2),
                            "clean_logit_diff": 3.0,
                            "corrupted_logit_diff": -1.0,
                            "normalized_effect": rng.gauss(0.5, 0.3),
                            "kl": rng.expovariate(1.0),
                            "flip": rng.random() < 0.4,
                            "patched_answer": 1.0,
                            "clean_answer": 1.0,
                            "corrupted_answer": 2.0,
                            "latent_cos": [rng.uniform(0.5, 1) for _ in range(k)],
                            "sim_positions": SIM_POSITIONS,
                            "sim_cos": matrix(0.5, 1.0),
                            "sim_rel_l2": matrix(0.0, 1.0),
                        }
                        if strategy == "iterative":
                            row["par_cos"], row["par_rel_l2"] = matrix(0.8, 1.0), matrix(0.0, 0.5)
                        rows.append(row)
    return rows


def write_run(out: Path, n_pairs: int = 4) -> Path:
    """A run directory as run_sweep writes it, from constructed rows; pair p1 fails one validity check."""
    out.mkdir(parents=True, exist_ok=True)
    rows = make_rows(n_pairs)
    config = SweepConfig(bootstrap=200)
    checks = lambda bad: {
        f"{c}/{s}": {"max_abs_diff": 0.5 if bad and c == "all_inputs_is_clean" else 0.0, "passed": not (bad and c == "all_inputs_is_clean")}
        for s in ("parallel", "iterative")
        for c in ("nothing_is_corrupted", "all_inputs_is_clean", "clean_into_clean_is_clean")
    }
    validity = [{"pair_id": f"p{p}", "checks": checks(p == 1), "passed": p != 1} for p in range(n_pairs)]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "validity.jsonl").write_text("".join(json.dumps(v) + "\n" for v in validity))
    (out / "summary.json").write_text(json.dumps(summarize(rows, validity, config)))
    run = {
        "config": {"hook": "resid_post", "strategies": ["parallel", "iterative"], "kinds": ["single", "all", "cumulative"], "layers": list(LAYERS), "seed": 0, "bootstrap": 200},
        "pairs": n_pairs,
        "pair_ids": [f"p{p}" for p in range(n_pairs)],
        "model": {"n_layers": N_MODEL_LAYERS, "num_latents": K},
    }
    (out / "run.json").write_text(json.dumps(run))
    return out


@pytest.fixture(scope="module")
def df(tmp_path_factory) -> pd.DataFrame:
    return load_results(write_run(tmp_path_factory.mktemp("run")))


FAST = {"n_resamples": 100}


@pytest.mark.parametrize("metric", ["normalized_effect", "logit_diff", "kl", "flip"])
def test_single_heatmap_z_is_the_per_cell_mean(df, metric):
    fig = heatmap(df, metric, kind="single", **FAST)
    expected = df[df.kind == "single"].groupby(["strategy", "position", "layer"])[metric].mean()  # flip: a rate
    assert [t.name for t in fig.data] == ["parallel", "iterative"]
    for trace in fig.data:
        assert list(trace.y) == list(LAYERS)
        assert list(trace.x) == [f"latent[{t}]" for t in range(K)]
        z = np.array(trace.z, dtype=float)
        for i, layer in enumerate(LAYERS):
            for j, pos in enumerate(trace.x):
                assert z[i, j] == pytest.approx(expected[trace.name, pos, layer])
    assert len({(t.zmin, t.zmax) for t in fig.data}) == 1  # one shared colour scale
    assert fig.layout.yaxis.title.text == "layer"
    title = fig.layout.title.text
    assert metric in title and "blocks.{L}.hook_resid_post" in title and "n = 4 pairs" in title


def test_heatmap_hover_has_mean_ci_and_n(df):
    trace = heatmap(df, "kl", strategy="iterative", kind="single", **FAST).data[0]
    assert trace.name == "iterative"
    hover = trace.customdata[1][2]
    assert "layer 2, latent[2]" in hover and "95% CI [" in hover and "n = 4 pairs" in hover


def test_cumulative_and_all_columns(df):
    cum = heatmap(df, "normalized_effect", kind="cumulative", **FAST)
    assert list(cum.data[0].x) == [f"k={j}" for j in range(1, K + 1)]
    rows = df[(df.kind == "cumulative") & (df.strategy == "parallel") & (df.layer == 5)]
    by_k = rows.groupby("k")["normalized_effect"].mean()
    assert np.array(cum.data[0].z, dtype=float)[2].tolist() == pytest.approx(by_k.tolist())
    allfig = heatmap(df, "normalized_effect", kind="all", **FAST)
    assert list(allfig.data[0].x) == ["all latents"] and np.array(allfig.data[0].z).shape == (len(LAYERS), 1)


def test_missing_cells_and_nans(df):
    """NaN values are dropped from a cell's mean, as pandas does; an empty selection is a clear error."""
    d = df.copy()
    d.loc[(d.kind == "single") & (d.layer == 0) & (d.pair_id == "p0"), "normalized_effect"] = math.nan
    fig = heatmap(d, kind="single", **FAST)
    expected = d[(d.kind == "single") & (d.layer == 0) & (d.strategy == "parallel")].groupby("position")["normalized_effect"].mean()
    assert np.array(fig.data[0].z, dtype=float)[0].tolist() == pytest.approx(expected.tolist())
    with pytest.raises(ValueError, match="no rows with kind='single', strategy='other'"):
        heatmap(df, strategy="other", **FAST)


def constructed_differences() -> pd.DataFrame:
    """4 pairs, layers 0-1, single latents 0-2; iterative - parallel is consistently positive at
    (0, latent[1]), consistently negative at (1, latent[2]), and noise around zero elsewhere."""
    rows = []
    noise = [-0.2, 0.2, -0.1, 0.1]
    for p in range(4):
        for layer in (0, 1):
            for t in range(3):
                diff = {(0, 1): 0.5 + 0.01 * p, (1, 2): -0.3 - 0.02 * p}.get((layer, t), noise[p])
                base = 0.1 * p + layer
                for strategy, value in (("parallel", base), ("iterative", base + diff)):
                    rows.append(
                        {
                            "pair_id": f"p{p}",
                            "hook": f"blocks.{layer}.hook_resid_post",
                            "layer": layer,
                            "kind": "single",
                            "latents": [t],
                            "k": 1,
                            "position": f"latent[{t}]",
                            "strategy": strategy,
                            "normalized_effect": value,
                        }
                    )
    return pd.DataFrame(rows)


def test_difference_heatmap_centred_and_marked():
    d = constructed_differences()
    fig = difference_heatmap(d, **FAST)
    trace = fig.data[0]
    assert trace.zmid == 0 and trace.zmin == -trace.zmax
    wide = d.pivot_table(index=["pair_id", "layer", "position"], columns="strategy", values="normalized_effect")
    expected = (wide["iterative"] - wide["parallel"]).groupby(["layer", "position"]).mean()
    z = np.array(trace.z, dtype=float)
    marked = set()
    for i, layer in enumerate(trace.y):
        for j, pos in enumerate(trace.x):
            assert z[i, j] == pytest.approx(expected[layer, pos])
            if trace.text[i][j].endswith("*"):
                marked.add((layer, pos))
    assert marked == {(0, "latent[1]"), (1, "latent[2]")}
    assert "n = 4 pairs" in fig.layout.title.text


def test_difference_needs_both_strategies(df):
    with pytest.raises(ValueError, match="both strategies"):
        difference_heatmap(df[df.strategy == "parallel"], **FAST)


@pytest.mark.parametrize("which,strategy", [("sim_cos", "parallel"), ("sim_rel_l2", "iterative"), ("par_cos", None)])
def test_similarity_heatmap_is_the_mean_matrix(df, which, strategy):
    fig = similarity_heatmap(df, which, strategy, kind="single", latents=[1])
    rows = df[(df.kind == "single") & (df.position == "latent[1]") & (df.strategy == (strategy or "iterative"))]
    assert len(fig.data) == len(LAYERS)
    for trace, layer in zip(fig.data, LAYERS):
        expected = np.mean([np.array(m) for m in rows[rows.layer == layer][which]], axis=0)
        np.testing.assert_allclose(np.array(trace.z, dtype=float), expected)
        assert list(trace.x) == SIM_POSITIONS and list(trace.y) == list(range(N_MODEL_LAYERS))
    assert len({(t.zmin, t.zmax) for t in fig.data}) == 1
    assert [a.text for a in fig.layout.annotations] == [f"patched at layer {layer}" for layer in LAYERS]


def test_par_similarity_is_iterative_only(df):
    with pytest.raises(ValueError, match="iterative rows only"):
        similarity_heatmap(df, "par_cos", "parallel")


def test_layer_lines(df):
    fig = layer_lines(df, "normalized_effect", "all", **FAST)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["parallel", "iterative"]
    for t in lines:
        expected = df[(df.kind == "all") & (df.strategy == t.name)].groupby("layer")["normalized_effect"].mean()
        assert list(t.x) == list(LAYERS) and list(t.y) == pytest.approx(expected.tolist())
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(bands) == 2 and all(len(b.x) == 2 * len(LAYERS) for b in bands)
    with pytest.raises(ValueError, match="pass latents"):
        layer_lines(df, kind="single")
    single = layer_lines(df, "kl", "single", latents=[2], **FAST)
    assert single.data[-1].y == pytest.approx(df[(df.kind == "single") & (df.position == "latent[2]") & (df.strategy == "iterative")].groupby("layer")["kl"].mean().tolist())


def test_select_adds_columns(df):
    cum = select(df, "cumulative", "parallel")
    assert sorted(cum["column"].unique()) == [1, 2, 3]


@pytest.fixture(scope="module")
def tiny_model(tiny_codi):
    from interp import load_codi

    _, base, tok, paths = tiny_codi
    return load_codi(paths["bin"], (base, tok), device="cpu")


def test_latent_decoding_table(tiny_model):
    """The logit lens at the last layer is the model's own next-token readout: it must agree with
    decode_latents' top state token; every layer gets a column."""
    torch.manual_seed(0)
    trace = tiny_model.trace("3 +4 *7")
    fig = latent_decoding_table(tiny_model, trace, k=2)
    table = fig.data[0]
    n = tiny_model.cfg.n_layers
    assert list(table.header.values) == ["latent", "state top-2", "embedding top-2"] + [f"lens L{layer}" for layer in range(n)]
    cells = table.cells.values
    assert list(cells[0]) == [f"latent[{t}]" for t in range(tiny_model.num_latents)]
    decoded = tiny_model.decode_latents(trace, k=1)
    assert list(cells[3 + n - 1]) == [repr(d["state"][0][0]) for d in decoded]
    from_generation = latent_decoding_table(tiny_model, trace.generation, k=2).data[0].cells.values
    assert [list(c) for c in from_generation] == [list(c) for c in cells]


def test_heatmap_ci_matches_summary_json(df, tmp_path):
    """Same bootstrap function, resamples and seed as the sweep: the hover CI is summary.json's."""
    summary = json.loads((write_run(tmp_path / "run")).joinpath("summary.json").read_text())
    cell = next(c for c in summary["cells"] if (c["strategy"], c["kind"], c["layer"], c["latents"]) == ("iterative", "single", 5, [2]))
    trace = heatmap(df, "normalized_effect", kind="single", n_resamples=200, seed=0).data[1]
    ne = cell["normalized_effect"]
    assert trace.customdata[LAYERS.index(5)][2].endswith(f"mean {ne['mean']:.4g}<br>95% CI [{ne['ci_low']:.3g}, {ne['ci_high']:.3g}]<br>n = 4 pairs")
