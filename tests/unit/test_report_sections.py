"""The report a researcher asked for: effects by changed slot, similarity for every latent set,
definitions, examples, cells resting on few pairs flagged."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from interp.plots import similarity_heatmap, slot_heatmap
from interp.report import DEFINITIONS, report_figures, write_report
from tests.unit.test_plots import make_rows, write_run


@pytest.fixture()
def df() -> pd.DataFrame:
    rows = make_rows(n_pairs=4)
    for r in rows:
        r["changed_slot"] = int(r["pair_id"][1:]) % 2  # p0, p2 changed slot 0; p1, p3 slot 1
    return pd.DataFrame(rows)


def test_slot_heatmap_is_the_mean_over_the_pairs_of_each_slot(df):
    fig = slot_heatmap(df, "normalized_effect", "single", layer=2, n_resamples=50)
    trace = next(t for t in fig.data if t.name is None and "parallel" in t.hovertemplate)
    assert list(trace.y) == [0, 1]
    at = df[(df.kind == "single") & (df.layer == 2) & (df.strategy == "parallel")]
    for i, slot in enumerate((0, 1)):
        for t in range(3):
            cell = at[(at.changed_slot == slot) & (at.latents.map(lambda x, t=t: x == [t]))]["normalized_effect"]
            assert trace.z[i][t] == pytest.approx(cell.mean())
            assert trace.text[i][t].endswith("†")  # 2 pairs per cell: fewer than 10
    assert "fewer than 10 pairs" in fig.layout.title.text


def test_slot_heatmap_refuses_rows_without_slots():
    with pytest.raises(ValueError, match="changed_slot"):
        slot_heatmap(pd.DataFrame(make_rows(n_pairs=2)), "normalized_effect")


def test_report_shows_similarity_for_every_latent_set_and_says_which_layer_is_read(df):
    names = [name for name, _ in report_figures(df, {"config": {"bootstrap": 50}})]
    for kind, sets in (("single", ["0", "1", "2"]), ("cumulative", ["0", "0-1", "0-1-2"]), ("all", ["0-1-2"])):
        for s in sets:
            assert f"similarity_sim_cos_parallel_{kind}_{s}" in names and f"similarity_par_cos_{kind}_{s}" in names
    assert "slots_normalized_effect_single" in names
    fig = similarity_heatmap(df, "sim_cos", "parallel", "single", (1,))
    assert "layer read out, not the layer patched" in fig.layout.title.text and fig.layout.yaxis.title.text == "layer read out"


def test_page_defines_every_metric_and_shows_examples(tmp_path):
    run = write_run(tmp_path / "run")
    examples = [{"question": "7 +5", "answer": "The answer is : 2", "intermediates": [2.0], "latents": [{"state": [["2", 0.9]], "embedding": [["7", 0.5]]}]}]
    (run / "examples.json").write_text(json.dumps(examples))
    page = write_report(run).read_text()
    for name in ("normalized_effect", "logit_diff", "kl", "flip", "sim_cos / sim_rel_l2", "latent_cos", "changed slot"):
        assert f"<dt><b>{name}</b></dt>" in page and name in DEFINITIONS
    assert "<code>7 +5</code>" in page and "latent[0]</td><td>&#x27;2&#x27; 0.90" in page
