"""The findings table (interp.findings) from hand-written result files, and the README's table equals
what the committed result files give (so it cannot be edited by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from interp.findings import BEGIN, END, findings_table, readme_table, write_table
from interp.shipped import ShippedModel

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def toy(tmp_path) -> ShippedModel:
    """A Coconut-family record whose files hold numbers chosen by hand."""
    d = tmp_path / "model"
    d.mkdir()
    metrics = {
        "n_test": 100,
        "accuracy": 0.9,
        "accuracy_zero_thoughts": 0.2,
        "accuracy_mean_thoughts": 0.3,
        "swap_minimal_pairs": {"gives_A_answer": 0.85},
        "pause": {"accuracy": 0.4},
        "direct": {"accuracy": 0.1},
    }
    (d / "metrics.json").write_text(json.dumps(metrics))
    cell = lambda s, k, layer, e: {"strategy": s, "kind": k, "layer": layer, "normalized_effect": {"mean": e}}  # noqa: E731
    summary = {
        "n_pairs": 7,
        "cells": [cell("iterative", "all", 0, 0.8), cell("iterative", "all", 1, 0.6), cell("parallel", "all", 0, 0.1), cell("parallel", "all", 1, 0.3)],
        "iterative_minus_parallel": [
            {"kind": "all", "layer": 0, "mean": 0.7, "ci_excludes_zero": True},
            {"kind": "all", "layer": 1, "mean": 0.3, "ci_excludes_zero": False},
        ],
    }
    lens = [
        {"layer": 1, "position": "latent[0]", "target": "step[1]", "top1_rate": 0.2},
        {"layer": 1, "position": "latent[0]", "target": "step[2]", "top1_rate": 0.7},
        {"layer": 0, "position": "latent[0]", "target": "step[1]", "top1_rate": 0.99},  # not the last layer
        {"layer": 1, "position": "latent[1]", "target": "step[2]", "top1_rate": 0.4},
    ]
    probes = [
        {"layer": 0, "position": "latent[0]", "target": "step[1]", "accuracy": 0.95, "selectivity": 0.8},
        {"layer": 1, "position": "latent[0]", "target": "step[1]", "accuracy": 0.5, "selectivity": 0.1},
        {"layer": 1, "position": "latent[0]", "target": "step[2]", "accuracy": 0.92, "selectivity": 0.2},  # not selective
        {"layer": 1, "position": "latent[1]", "target": "answer", "accuracy": 1.0, "selectivity": 0.9},  # the answer is not a step
    ]
    knockout = [{"edge": "latents -> latents", "layer": "all", "accuracy": 0.25, "baseline_accuracy": 0.9}, {"edge": "latents -> latents", "layer": 0, "accuracy": 0.5, "baseline_accuracy": 0.9}]
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "analysis.json").write_text(json.dumps({"lens": lens, "probes": probes, "knockout": knockout}))
    return ShippedModel("toy", "coconut", d, "checkpoint_1", 2, "docs/toy.md", False, "a toy objective", ("grid", "analysis"))


def test_table_cells_from_hand_written_files(toy, tmp_path):
    lines = findings_table([toy], root=tmp_path).splitlines()
    assert lines[0] == "| question | `toy` |"
    cells = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1].removesuffix(" |") for line in lines[2:]}
    assert cells["Is the chain forced by the training loss?"] == "no (a toy objective); may serve as a default"  # 90% - 40% >= 30 points, swap 85% >= 80%
    assert cells["Accuracy (controls of the same size and steps)"] == "90% (controls: pause 40%, direct 10%; 100 problems)"
    assert cells["What zeroing, averaging or swapping the thoughts does"] == "zeroed 20%, mean thought 30%; swap A -> B gives A's answer 85%"
    assert cells["Does iterative differ from parallel?"] == "differ in 1 of 2 (layer, latent set) cells (95% CI excludes 0; 7 pairs); largest +0.70 (all, layer 0)"
    assert cells["Through which path (feedback = the map into the next thought only)?"] == "all-thoughts patch, mean normalized effect over layers: iterative +0.70, parallel +0.20"
    assert cells["Which thought holds which value: logit lens"] == "value named by the last layer in >= 50% of problems: latent[0]: step[2] 70%; latent[1]: none (best step[2] 40%)"
    assert cells["Which thought holds which value: probes"] == "values read at >= 90% (selectivity >= 0.5) at the best layer: latent[0]: step[1] 95%; latent[1]: none"
    assert cells["Does latent -> latent attention matter?"] == "cutting latents -> latents at every layer: accuracy 90% -> 25%"


def test_missing_results_say_not_run_and_a_weak_model_is_not_a_default(toy, tmp_path):
    m = json.loads((toy.directory / "metrics.json").read_text())
    m["swap_minimal_pairs"]["gives_A_answer"] = 0.79
    (toy.directory / "metrics.json").write_text(json.dumps(m))
    table = findings_table([toy], root=tmp_path / "elsewhere")
    assert "not a default" in table and table.count("| not run") == 5


def test_write_table_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold table\n{END}\nafter\n")
    write_table(readme, "| a |\n| --- |")
    assert readme.read_text() == f"intro\n{BEGIN}\n| a |\n| --- |\n{END}\nafter\n"
    assert readme_table(readme) == "| a |\n| --- |"
    (tmp_path / "other.md").write_text("no block\n")
    with pytest.raises(ValueError, match="has no findings block"):
        write_table(tmp_path / "other.md", "x")


def test_readme_table_is_the_one_the_result_files_give():
    assert readme_table(REPO / "README.md") == findings_table(), "the README's findings table is stale: run `interp findings --write README.md`"
