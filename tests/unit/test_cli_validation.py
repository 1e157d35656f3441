"""Arguments are checked before anything is written: one line naming the argument and what is accepted.

Exit status 2 for usage errors, 1 for failures; the run directory (or its absence) and the bytes of
results.jsonl and pairs.json are unchanged. All on the embedded model (4 layers, 6 latents).
"""

from __future__ import annotations

import os

import pytest

from interp.cli import main
from interp.data import save_pairs
from interp.data.arithmetic import arithmetic_pairs
from interp.runio import open_run
from tests.factories import on_aligned


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    save_pairs(path, arithmetic_pairs(1, seed=3), {"source": "test"})
    return path


def fails(args: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of a command that must fail; stderr must be one line."""
    with pytest.raises(SystemExit) as info:
        main(on_aligned(args))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return info.value.code, err.rstrip("\n")


def snapshot(directory) -> dict[str, bytes] | None:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()} if directory.exists() else None


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        (["--device", "tpu"], 2, "error: --device tpu: accepted: cpu, cuda, cuda:N"),
        (["--num-latents", "0"], 2, "error: --num-latents 0: accepted: 1 or more"),
        (["--num-latents", "100"], 2, "error: --num-latents 100: the shipped model 'aligned' is trained with 6; accepted: 6, or --checkpoint/--base for another model"),
        (["--layers", "7"], 2, "error: --layers 7: 7 is not valid; accepted: 0,1,2,3"),
        (["--layers", "0,0"], 2, "error: --layers 0,0: 0 is listed twice; give each once"),
        (["--layers", "1,x"], 2, "error: --layers 1,x: accepted: comma-separated layer numbers, e.g. 0,2,3"),
        (["--kinds", "single,pairs"], 2, "error: --kinds single,pairs: 'pairs' is not valid; accepted: single,all,cumulative"),
        (["--strategy", "parallel,parallel"], 2, "error: --strategy parallel,parallel: parallel is listed twice; give each once"),
        (
            ["--hook", "blocks.{X}.hook_resid_post"],
            2,
            "error: --hook 'blocks.{X}.hook_resid_post': a template may hold only {L} (the layer) in braces; accepted: a family (resid_pre|resid_mid|resid_post|attn_out|mlp_out) or a template with {L} like 'blocks.{L}.attn.hook_z'",  # noqa: E501
        ),
    ],
)
def test_bad_argument_is_one_line_and_writes_nothing(pairs_file, tmp_path, capsys, extra, status, message):
    out = tmp_path / "run"
    code, err = fails(["patch", "--pairs", str(pairs_file), "--out", str(out), *extra], capsys)
    assert (code, err) == (status, message)
    assert not out.exists()


def test_hook_without_a_layer_is_refused(pairs_file, tmp_path, capsys):
    code, err = fails(["patch", "--pairs", str(pairs_file), "--out", str(tmp_path / "run"), "--hook", "{L}"], capsys)
    assert code == 2 and err.startswith("error: --hook '{L}': unknown hook '0'; TransformerLens names look like ")
    assert err.endswith("; accepted: a family (resid_pre|resid_mid|resid_post|attn_out|mlp_out) or a template with {L} like 'blocks.{L}.attn.hook_z'")
    assert not (tmp_path / "run").exists()


def test_n_must_be_positive(tmp_path, capsys):
    code, err = fails(["run", "--n", "0", "--out", str(tmp_path / "run")], capsys)
    assert (code, err) == (2, "interp run: error: argument --n: 0; accepted: 1 or more; see interp run --help")
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_or_not_writable(pairs_file, tmp_path, capsys, monkeypatch):
    target = tmp_path / "results.txt"
    target.write_bytes(b"keep me")
    code, err = fails(["patch", "--pairs", str(pairs_file), "--out", str(target)], capsys)
    assert (code, err) == (2, f"error: --out {target}: exists and is not a directory; accepted: a directory (new or a run to resume)")
    assert target.read_bytes() == b"keep me"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    code, err = fails(["patch", "--pairs", str(pairs_file), "--out", str(tmp_path / "new" / "run")], capsys)
    assert (code, err) == (2, f"error: --out {tmp_path / 'new' / 'run'}: {tmp_path} is not writable; accepted: a path under a writable directory")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    code, err = fails(["patch", "--pairs", str(pairs_file), "--out", "/proc/interp-run"], capsys)  # writable by permissions (as root), not in fact
    assert code == 2 and err.startswith("error: --out /proc/interp-run: /proc is not writable") and err.endswith("accepted: a path under a writable directory")


def test_base_config_that_is_not_json(tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{not json")
    code, err = fails(["patch", "--pairs", "p.json", "--checkpoint", str(tmp_path), "--base", str(base), "--out", str(tmp_path / "run")], capsys)
    assert (code, err) == (
        2,
        f"error: --base {base}: {base / 'config.json'} is not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); accepted: a Hugging Face model directory",
    )
    assert not (tmp_path / "run").exists()


def test_resume_with_other_arguments_is_refused_and_changes_nothing(pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    main(on_aligned(["patch", "--pairs", str(pairs_file), "--out", str(out), "--layers", "1", "--kinds", "all"]))
    capsys.readouterr()
    before = snapshot(out)
    code, err = fails(["patch", "--pairs", str(pairs_file), "--out", str(out), "--layers", "2", "--kinds", "all"], capsys)
    assert (code, err) == (2, f"error: --out {out} holds another experiment, differing in config.layers ([1] -> [2]); pass --force-new to start over or choose another --out")
    assert snapshot(out) == before
    code, err = fails(["patch", "--pairs", str(pairs_file), "--out", str(out), "--layers", "1", "--kinds", "all", "--dtype", "bfloat16"], capsys)
    assert code == 2 and err.startswith(f'error: --out {out} holds another experiment, differing in model.dtype ("float32" -> "bfloat16"), ')
    assert snapshot(out) == before
    main(on_aligned(["patch", "--pairs", str(pairs_file), "--out", str(out), "--layers", "2", "--kinds", "all", "--force-new"]))
    assert snapshot(out)["results.jsonl"] != before["results.jsonl"]


def test_locked_run_is_a_failure_naming_the_holder(pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    with open_run(out, {"x": 1}, {}):
        before = snapshot(out)
        code, err = fails(["patch", "--pairs", str(pairs_file), "--out", str(out)], capsys)
        assert code == 1 and err.startswith(f"error: {out} is being written by process {os.getpid()} on ")
        assert err.endswith("; wait for it to finish or choose another --out")
        assert snapshot(out) == before


def test_interp_run_keeps_pairs_json_when_the_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--n", "2", "--layers", "0", "--kinds", "all", "--strategy", "parallel", "--out", str(out)]
    main(on_aligned(args))
    capsys.readouterr()
    before = snapshot(out)
    code, err = fails([*args[:-2], "--layers", "0,0", "--out", str(out)], capsys)
    assert (code, err) == (2, "error: --layers 0,0: 0 is listed twice; give each once")
    code, err = fails(["run", "--n", "3", "--layers", "0", "--kinds", "all", "--strategy", "parallel", "--out", str(out)], capsys)
    assert code == 2 and err.startswith(f"error: --out {out} holds another experiment, differing in pairs.n (2 -> 3), pairs.sha256 (")
    assert snapshot(out) == before  # pairs.json, results.jsonl, run.json: every byte
