"""Sweeps: resume without loss or repetition, validity failures reported, summary statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from interp import load_codi
from interp.data.arithmetic import arithmetic_pairs
from interp.runio import read_jsonl
from interp.stats import summarize
from interp.sweep import SweepConfig, run_sweep

CONFIG = SweepConfig(kinds=("single",), layers=(1,), bootstrap=200)


@pytest.fixture(scope="module")
def model(tiny_codi):
    _, base, tok, paths = tiny_codi
    return load_codi(paths["bin"], (base, tok), device="cpu")


class Interrupt(Exception):
    pass


def test_interrupted_sweep_resumes_without_loss_or_repetition(model, tmp_path):
    pairs = arithmetic_pairs(1, seed=3)
    calls = []

    def stop_after_three(metrics):
        calls.append(metrics)
        if len(calls) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_sweep(model, pairs, tmp_path / "run", CONFIG, progress=False, logger=stop_after_three)
    assert len(read_jsonl(tmp_path / "run" / "results.jsonl")) == 9  # 3 units x 3 strategies landed
    with open(tmp_path / "run" / "results.jsonl", "a") as f:
        f.write('{"test_id": "torn')  # a write cut short by the kill
    run_sweep(model, pairs, tmp_path / "run", CONFIG, progress=False)
    resumed = read_jsonl(tmp_path / "run" / "results.jsonl")
    ids = [r["test_id"] for r in resumed]
    assert len(ids) == len(set(ids)) == 18

    run_sweep(model, pairs, tmp_path / "fresh", CONFIG, progress=False)
    fresh = {r["test_id"]: r for r in read_jsonl(tmp_path / "fresh" / "results.jsonl")}
    assert set(fresh) == set(ids)
    for r in resumed:
        assert r["logit_diff"] == pytest.approx(fresh[r["test_id"]]["logit_diff"], abs=1e-6)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_tests"] == 18 and summary["validity"]["n_failed"] == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["versions"]["torch"].startswith(torch.__version__.split("+")[0]) and run["versions"]["transformer_lens"][0].isdigit() and run["config"]["layers"] == [1] and "finished" in run


def test_resume_refuses_other_config(model, tmp_path):
    pairs = arithmetic_pairs(1, seed=3)
    run_sweep(model, pairs, tmp_path, SweepConfig(kinds=("all",), layers=(0,), bootstrap=50), progress=False)
    with pytest.raises(ValueError, match=r"holds another experiment, differing in config\.layers \(\[0\] -> \[2\]\)"):
        run_sweep(model, pairs, tmp_path, SweepConfig(kinds=("all",), layers=(2,), bootstrap=50), progress=False)


def test_failed_validity_check_is_reported(model, tmp_path, monkeypatch, capsys):
    import importlib

    sweep = importlib.import_module("interp.sweep")  # the module: `interp.sweep` is also the in-memory sweep function

    real = sweep.trace_pair

    def broken(model, pair, **kwargs):  # a clean cache that does not belong to the clean run
        pt = real(model, pair, **kwargs)
        pt.clean.cache.cache_dict["blocks.0.hook_resid_pre"] = pt.clean.cache["blocks.0.hook_resid_pre"] * 1.5
        return pt

    monkeypatch.setattr(sweep, "trace_pair", broken)
    summary = run_sweep(model, arithmetic_pairs(1, seed=4), tmp_path, SweepConfig(kinds=("all",), layers=(0,), bootstrap=50), progress=False)
    assert summary["validity"]["n_failed"] == 1
    assert "all_inputs_is_clean/parallel" in summary["validity"]["failed"][0]["failed"]
    assert "nothing_is_corrupted/parallel" not in summary["validity"]["failed"][0]["failed"]
    assert summary["verdict"].startswith("WARNING: 1 pair(s) failed a validity check")
    captured = capsys.readouterr()
    assert "VALIDITY CHECK FAILED for pair arith-4-0" in captured.out + captured.err


def _rows(effects: dict[str, list[float]]) -> list[dict]:
    rows = []
    for strategy, values in effects.items():
        for i, v in enumerate(values):
            rows.append({"pair_id": f"p{i}", "strategy": strategy, "kind": "all", "layer": 0, "latents": [0, 1], "hook": "h", "normalized_effect": v, "logit_diff": v, "kl": 0.0, "flip": v > 0.5})
    return rows


def test_summary_means_and_paired_differences():
    rng = np.random.default_rng(0)
    par = rng.normal(0.2, 0.05, 30).tolist()
    it = [p + 0.5 + e for p, e in zip(par, rng.normal(0, 0.05, 30))]
    s = summarize(_rows({"parallel": par, "iterative": it}), [], SweepConfig(bootstrap=500))
    cell = next(c for c in s["cells"] if c["strategy"] == "parallel")
    assert cell["normalized_effect"]["mean"] == pytest.approx(np.mean(par))
    assert cell["normalized_effect"]["ci_low"] < np.mean(par) < cell["normalized_effect"]["ci_high"]
    assert cell["flip"]["mean"] == pytest.approx(np.mean([p > 0.5 for p in par]))
    diff = s["iterative_minus_parallel"][0]
    assert diff["mean"] == pytest.approx(np.mean(np.array(it) - np.array(par)))
    assert diff["ci_excludes_zero"] and 0.45 < diff["ci_low"] < diff["ci_high"] < 0.55
    assert s["verdict"].startswith("Iterative and parallel patching differ")


def test_summary_no_difference_and_too_few_pairs():
    same = [0.1, 0.4, 0.3, 0.2, 0.9]
    s = summarize(_rows({"parallel": same, "iterative": same}), [], SweepConfig(bootstrap=200))
    assert s["verdict"].startswith("No detectable difference")
    one = summarize(_rows({"parallel": [0.1], "iterative": [0.9]}), [], SweepConfig(bootstrap=200))
    assert "Too few pairs" in one["verdict"] and math.isnan(one["iterative_minus_parallel"][0]["ci_low"])


def test_in_memory_sweep_has_run_sweeps_rows_and_writes_nothing(model, tmp_path, monkeypatch):
    import pandas as pd

    import interp

    pairs = arithmetic_pairs(2, seed=1)
    config = SweepConfig(kinds=("single", "all"), layers=(0, 2), bootstrap=50)
    monkeypatch.chdir(tmp_path)
    df = interp.sweep(model, pairs, config, progress=False)
    assert list(tmp_path.iterdir()) == []
    run_sweep(model, pairs, tmp_path / "run", config, progress=False)
    on_disk = pd.DataFrame(read_jsonl(tmp_path / "run" / "results.jsonl"))
    assert len(df) == len(on_disk) == 2 * 2 * (model.num_latents + 1) * 3
    key = ["test_id"]
    a, b = df.sort_values(key).reset_index(drop=True), on_disk.sort_values(key).reset_index(drop=True)
    assert list(a.columns) == list(b.columns)
    for column in a.columns:
        if a[column].dtype.kind == "f":
            np.testing.assert_allclose(a[column], b[column], rtol=0, atol=1e-6, equal_nan=True)
        else:
            assert a[column].tolist() == b[column].tolist(), column
    assert [v["pair_id"] for v in df.attrs["validity"]] == [p.id for p in pairs] and all(v["passed"] for v in df.attrs["validity"])


def test_library_errors_name_sweep_config_fields(model):
    import interp
    from interp.sweep import ConfigError

    with pytest.raises(ConfigError, match=r"^SweepConfig\.layers 0,0: 0 is listed twice; give each once$"):
        interp.sweep(model, arithmetic_pairs(1), SweepConfig(layers=(0, 0)))
    with pytest.raises(ConfigError, match=r"^SweepConfig\.strategies parallel,sideways: 'sideways' is not valid"):
        interp.sweep(model, arithmetic_pairs(1), SweepConfig(strategies=("parallel", "sideways")))
    with pytest.raises(ConfigError, match=r"^pairs: no pairs"):
        interp.sweep(model, [], SweepConfig())
