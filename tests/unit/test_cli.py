"""The command line on the embedded default model: generate, pairs, patch (with W&B offline)."""

from __future__ import annotations

import json

import pytest

from interp.cli import main
from interp.data import load_pairs


@pytest.fixture(scope="module")
def default_model():
    from interp import load_default

    return load_default()


def test_generate_prints_latents_and_answer(default_model, capsys):
    question = "7 +5 *3 -2 *7 +4 -1"
    main(["generate", question])
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
    main(["pairs", "--source", "arithmetic", "--n", "3", "--out", str(pairs_file)])
    pairs, meta = load_pairs(pairs_file)
    assert len(pairs) == 3 and meta["counts"]["model"]["kept"] >= 3
    out = tmp_path / "run"
    main(["patch", "--pairs", str(pairs_file), "--layers", "1", "--kinds", "all", "--out", str(out), "--quick", "--wandb"])
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
        main(["patch", "--pairs", str(bad), "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err
