"""Every command on a Coconut checkpoint (tiny random GPT-2 base, the official checkpoint_N format):
the CLI goes through `interp.load_model`, so nothing in it is family-specific."""

from __future__ import annotations

import json

import pytest

from interp.cli import main
from interp.data import load_pairs
from interp.executor import ModelSpec


@pytest.fixture(scope="module")
def model_args(tiny_gpt2_coconut, one_thread):
    return ["--checkpoint", str(tiny_gpt2_coconut.ckpt_dir), "--base", str(tiny_gpt2_coconut.base_dir)]


def test_generate_with_and_without_thoughts(model_args, tiny_gpt2_coconut, capsys):
    c = tiny_gpt2_coconut
    main(["generate", *model_args, "--num-latents", "3", "--max-new-tokens", "4", "Tom is a cat."])
    captured = capsys.readouterr()
    assert captured.out.count("latent[") == 3
    assert "loaded coconut checkpoint" in captured.err and "checkpoint_3" in captured.err
    thoughts, tokens = c.ref.generate_ids(c.ref.prompt_ids(c.tokenizer, "Tom is a cat.", 3), 4)
    assert f"answer text: {c.tokenizer.decode(tokens, skip_special_tokens=True)!r}" in captured.out
    main(["generate", *model_args, "--num-latents", "0", "Tom is a cat."])
    assert "latent[" not in capsys.readouterr().out


def test_pairs_patch_report_run_and_analyze(model_args, tmp_path, capsys):
    pairs_file = tmp_path / "pairs.json"
    main(["pairs", *model_args, "--source", "arithmetic", "--n", "3", "--no-filter", "--out", str(pairs_file)])
    pairs, _ = load_pairs(pairs_file)
    assert len(pairs) == 3
    out = tmp_path / "patch"
    main(["patch", *model_args, "--pairs", str(pairs_file), "--layers", "1", "--kinds", "single", "--out", str(out), "--quick"])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["strategy"] for r in rows} == {"parallel", "iterative", "feedback"} and len(rows) == 3 * 6 * 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["validity"]["n_failed"] == 0  # nothing patched = corrupted, all clean = clean, clean into clean = clean
    assert json.loads((out / "run.json").read_text())["fingerprint"]["model"]["load_options"]["family"] == "coconut"
    main(["report", str(out), "--no-png"])
    assert "Model: Coconut (thought = the final-normed state itself), gpt2 base, 6 thoughts." in (out / "report.html").read_text()
    main(["run", *model_args, "--pairs", str(pairs_file), "--layers", "0", "--kinds", "all", "--strategy", "parallel,iterative", "--out", str(tmp_path / "run"), "--quick"])
    assert (tmp_path / "run" / "report.html").is_file()
    main(["analyze", *model_args, "--source", "arithmetic", "--n", "6", "--quick", "--no-filter", "--out", str(tmp_path / "analysis")])
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert analysis["lens"] and analysis["probes"] and analysis["meta"]["provenance"]["load_options"]["family"] == "coconut"
    assert "Model: Coconut" in (tmp_path / "analysis" / "report.html").read_text()
    capsys.readouterr()


def test_codi_only_options_are_refused_for_coconut(model_args, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", *model_args, "--lora-alpha", "16", "Tom is a cat."])
    assert info.value.code == 2
    assert "is a Coconut checkpoint; lora_alpha apply to CODI checkpoints only" in capsys.readouterr().err


def test_the_worker_spec_loads_either_family(tiny_gpt2_coconut, tiny_codi):
    c = tiny_gpt2_coconut
    model = ModelSpec(checkpoint=str(c.ckpt_dir), base=str(c.base_dir), device="cpu", num_latents=2).load()
    assert model.family.name == "coconut" and model.num_latents == 2


def test_prosqa_pairs_from_the_released_file_patch_on_coconut(tiny_llama_coconut, tmp_path, capsys):
    """`--source prosqa`: released problems, one pair per problem whose edited word aligns, both
    answers recomputed from the graph; the sweep scores the answers' first differing token after ###."""
    from tests.conftest import REPO

    c = tiny_llama_coconut
    args = ["--checkpoint", str(c.ckpt_dir), "--base", str(c.base_dir), "--num-latents", "2"]
    pairs_file = tmp_path / "pairs.json"
    main(["pairs", *args, "--source", "prosqa", "--prosqa", str(REPO.parent / "shared" / "data" / "prosqa" / "valid.json"), "--n", "2", "--no-filter", "--out", str(pairs_file)])
    pairs, meta = load_pairs(pairs_file)
    assert len(pairs) == 2 and len({p.source["index"] for p in pairs}) == 2
    for p in pairs:
        assert isinstance(p.clean_answer, str) and p.clean_answer.startswith(p.source["root"]) and p.corrupted_answer.endswith(p.source["neg_target"] + ".")
    out = tmp_path / "run"
    main(["patch", *args, "--pairs", str(pairs_file), "--layers", "1", "--kinds", "single", "--strategy", "parallel,iterative", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 and json.loads((out / "summary.json").read_text())["validity"]["n_failed"] == 0
    assert {r["clean_answer"] for r in rows} == {p.clean_answer for p in pairs}
    capsys.readouterr()
