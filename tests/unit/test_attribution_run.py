"""`interp patch --method atp|atp+verify`: attribution rows in a run directory, verified against an
independent exact patch, resumable, and its report (interp/attribution_run.py)."""

from __future__ import annotations

import json

import pytest
import torch

import interp
from benchmarks.naive import naive_patch
from interp.cli import main
from interp.data import arithmetic_pairs, save_pairs
from interp.runio import read_jsonl
from tests.factories import on_aligned

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return interp.load_default("aligned")


@pytest.fixture
def pairs_file(tmp_path):
    pairs = arithmetic_pairs(2, seed=5)
    path = tmp_path / "pairs.json"
    save_pairs(path, pairs, {"source": "arithmetic"})
    return path, pairs


def test_atp_verify_rows_match_attribute_and_an_independent_exact_patch(model, pairs_file, tmp_path, capsys):
    path, pairs = pairs_file
    out = tmp_path / "atp"
    main(on_aligned(["patch", "--pairs", str(path), "--method", "atp+verify", "--top-k", "3", "--hook", "resid_post", "--strategy", "parallel,iterative", "--out", str(out)]))
    printed = capsys.readouterr().out
    assert "parallel: " in printed and "Spearman vs exact" in printed
    rows = read_jsonl(out / "attribution.jsonl")
    pt = interp.trace_pair(model, pairs[0])
    sites = model.cfg.n_layers * pt.corrupted.seq_len
    assert len(rows) == len(pairs) * 2 * sites
    mine = [r for r in rows if r["pair_id"] == pairs[0].id and r["strategy"] == "iterative"]
    expected = interp.attribute(model, pt, "resid_post", "iterative")
    assert [r["estimate"] for r in mine] == pytest.approx(expected["estimate"].tolist(), abs=1e-6)
    verified = [r for r in mine if r.get("exact") is not None]
    assert len(verified) == 6  # the top 3 and 3 random others
    ranked = sorted(mine, key=lambda r: -abs(r["estimate"]))[:3]
    assert all(r.get("exact") is not None for r in ranked)
    for r in verified:  # exact = the naive full-recompute patch's change of the logit difference
        p = pt.corrupted.layout.position(r["position"])
        patched = naive_patch(model, pt.corrupted, pt.clean, [interp.Site(r["hook"], (p,))], "iterative", max_new_tokens=1)
        change = (patched.next_logits[pt.clean_token] - patched.next_logits[pt.corrupted_token]) - (pt.corrupted.next_logits[pt.clean_token] - pt.corrupted.next_logits[pt.corrupted_token])
        assert r["exact"] == pytest.approx(float(change), abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategies"]["iterative"]["verified"] == 6 * len(pairs) and -1 <= summary["strategies"]["iterative"]["spearman"] <= 1
    assert "AtP estimate" in (out / "report.html").read_text() and json.loads((out / "run.json").read_text())["method"] == "atp+verify"


def test_an_interrupted_run_resumes_without_redoing_a_pair(model, pairs_file, tmp_path, monkeypatch):
    import interp.attribution_run as run_module

    path, pairs = pairs_file
    out = tmp_path / "atp"
    calls = []
    real = run_module.attribute

    def counted(model, pt, *args, **kwargs):
        calls.append(pt.pair.id)
        if len(calls) == 2:  # the second pair's first strategy
            raise KeyboardInterrupt
        return real(model, pt, *args, **kwargs)

    monkeypatch.setattr(run_module, "attribute", counted)
    args = ["patch", "--pairs", str(path), "--method", "atp", "--strategy", "parallel", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert {r["pair_id"] for r in read_jsonl(out / "attribution.jsonl")} == {pairs[0].id}
    main(args)
    assert calls[2:] == [pairs[1].id]  # only the unfinished pair ran again
    rows = read_jsonl(out / "attribution.jsonl")
    assert len({r["row_id"] for r in rows}) == len(rows) and {r["pair_id"] for r in rows} == {p.id for p in pairs}


def test_method_and_top_k_are_checked_before_anything_runs(pairs_file, tmp_path, capsys):
    path, _ = pairs_file
    for extra, message in (
        (["--method", "gradient"], "error: --method gradient: accepted: exact, atp, atp+verify"),
        (["--method", "atp+verify"], "error: --top-k 0: atp+verify patches each pair's top K sites exactly; accepted: 1 or more"),
        (["--method", "atp", "--top-k", "3"], "error: --top-k 3: applies to --method atp+verify only (got --method atp)"),
    ):
        with pytest.raises(SystemExit) as info:
            main(on_aligned(["patch", "--pairs", str(path), "--out", str(tmp_path / "x"), *extra]))
        assert info.value.code == 2 and capsys.readouterr().err.strip() == message
    assert not (tmp_path / "x").exists()
    assert torch.get_num_threads() == 1
