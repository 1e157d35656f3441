"""The analyses on the embedded model, whose ground truth is known (docs/embedded_model.md).

The model card: latent t's fed embedding holds v_t (the running value after step t) and the final
state computed at latent t holds v_(t+1), the value prj turns into the next latent.
"""

from __future__ import annotations

import pytest

from interp import load_default
from interp.analysis import collect, logit_lens, probe_rows
from interp.analysis.activations import problems_from_pairs
from interp.data import arithmetic_pairs

N = 200


@pytest.fixture(scope="module")
def acts(one_thread):
    model = load_default("aligned")
    return model, collect(model, problems_from_pairs(arithmetic_pairs(N, seed=14)))


def test_final_layer_lens_names_the_next_running_value(acts):
    model, a = acts
    rows, _ = logit_lens(model, a)
    last = model.cfg.n_layers - 1
    rate = {(r["position"], r["target"]): r["top1_rate"] for r in rows if r["layer"] == last}
    for t in range(1, 6):  # latent t (1-based) is position latent[t-1]
        assert rate[(f"latent[{t - 1}]", f"step[{t + 1}]")] >= 0.95, (t, rate[(f"latent[{t - 1}]", f"step[{t + 1}]")])


def test_some_probe_reads_each_latents_value_selectively(acts):
    _, a = acts
    rows = probe_rows(a, positions=[f"latent[{t}]" for t in range(6)], targets=[f"step[{k}]" for k in range(1, 8)])
    best = {}
    for r in rows:
        key = (r["position"], r["target"])
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    for t in range(1, 7):  # the value latent t holds as fed: v_t
        r = best[(f"latent[{t - 1}]", f"step[{t}]")]
        assert r["accuracy"] >= 0.9 and r["selectivity"] > 0.2, (t, r)
    for t in range(1, 6):  # the value its final state holds: v_(t+1)
        r = best[(f"latent[{t - 1}]", f"step[{t + 1}]")]
        assert r["accuracy"] >= 0.9 and r["selectivity"] > 0.2, (t, r)
