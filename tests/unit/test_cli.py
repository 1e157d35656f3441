"""The command line on the embedded default model: generate, pairs, patch (with W&B offline)."""

from __future__ import annotations

import json

import pytest

from interp.cli import main
from interp.data import load_pairs
from tests.factories import on_aligned


@pytest.fixture(scope="module")
def default_model():
    from interp import load_default

    return load_default("aligned")


def test_generate_prints_latents_and_answer(default_model, capsys):
    question = "7 +5 *3 -2 *7 +4 -1"
    main(on_aligned(["generate", question]))
    out = capsys.readouterr().out
    gen = default_model.generate(question)
    assert out.count("latent[") == 6
    assert f"answer text: {gen.text!r}" in out
    assert out.strip().endswith(f"answer: {gen.answer}")
    assert gen.answer == 1.0  # 7+5=2, *3=6, -2=4, *7=8, +4=2, -1=1


def test_pairs_then_patch_with_wandb_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    pairs_file = tmp_path / "pairs.json"
    main(on_aligned(["pairs", "--source", "arithmetic", "--n", "3", "--out", str(pairs_file)]))
    pairs, meta = load_pairs(pairs_file)
    assert len(pairs) == 3 and meta["counts"]["model"]["kept"] >= 3
    out = tmp_path / "run"
    main(on_aligned(["patch", "--pairs", str(pairs_file), "--layers", "1", "--kinds", "all", "--out", str(out), "--quick", "--wandb"]))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 3 and {r["strategy"] for r in rows} == {"parallel", "iterative", "feedback"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["validity"]["n_failed"] == 0
    assert summary["verdict"] in capsys.readouterr().out
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B wrote no offline run"


def test_patch_rejects_malformed_pairs_file(tmp_path, capsys):
    bad = tmp_path / "pairs.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(SystemExit) as info:
        main(on_aligned(["patch", "--pairs", str(bad), "--out", str(tmp_path / "run")]))
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_run_over_several_checkpoints_writes_a_run_each_and_a_comparison(tmp_path):
    """Two checkpoints (the embedded weights at two paths, the second renamed): same pairs, two run
    directories with the same rows, and a comparison of both."""
    import json
    import shutil

    from interp.cli import main
    from interp.loading import EMBEDDED_DIR

    second = tmp_path / "ckpt-b" / "model.safetensors"
    second.parent.mkdir()
    shutil.copy(EMBEDDED_DIR / "model.safetensors", second)
    first = str(EMBEDDED_DIR / "model.safetensors")
    out = tmp_path / "cmp"
    main(["run", "--checkpoints", f"{first},{second}", "--base", str(EMBEDDED_DIR / "base"), "--n", "2", "--layers", "1", "--kinds", "all", "--strategy", "parallel,iterative", "--out", str(out)])
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 2 and (out / "pairs.json").exists() and (out / "comparison.html").exists()
    rows = [{r["test_id"]: r["logit_diff"] for r in map(json.loads, (run / "results.jsonl").read_text().splitlines())} for run in runs]
    assert len(rows[0]) == 2 * 2 and rows[0] == rows[1]  # the same weights: the same rows
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["verdicts"]) == {first, str(second)}
    assert {(c["checkpoint"], c["strategy"], c["metric"]) for c in comparison["cells"]} >= {(first, "iterative", "flip"), (str(second), "parallel", "normalized_effect")}


def test_pairs_whose_questions_do_not_fit_the_context_are_refused_in_one_line(tmp_path, capsys):
    """three-step questions tokenize to more than the embedded model's 64 positions allow: a usage error, no file."""
    from interp.cli import main

    with pytest.raises(SystemExit) as info:
        main(on_aligned(["pairs", "--source", "three-step", "--n", "2", "--out", str(tmp_path / "p.json")]))
    assert info.value.code == 2 and not (tmp_path / "p.json").exists()
    assert "error: --source three-step: every question is longer than the model's context allows (n_ctx 64)" in capsys.readouterr().err


def test_the_default_is_the_most_faithful_model_that_passes_both_tests(capsys):
    """Unforced before forced, among the shipped models >= 30 points above their controls whose swapped
    thoughts give the donor's answer >= 80%: `codi`, then `aligned`; the CLI names the one it loads."""
    from interp import load_default
    from interp.shipped import SHIPPED, defaults

    assert defaults() == ["codi", "aligned"]
    assert [n for n, m in SHIPPED.items() if not m.qualification()[0]] == ["coconut", "coconut-stage3"]
    main(["generate", "7 +5 *3"])
    out = capsys.readouterr().out
    assert out.startswith("model: shipped 'codi' (the published CODI objective; trained by the published objective alone; accuracy 66.8% vs direct control 9.8% (+57.0%)")
    with pytest.raises(ValueError, match="may not serve as a default"):
        load_default("coconut")
