"""A run directory is one experiment (its fingerprint) written by one process (its lock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from interp import load_codi
from interp.runio import (
    RESULTS,
    RunError,
    UsageError,
    file_sha256,
    fingerprint_diff,
    model_fingerprint,
    open_run,
    source_fingerprint,
)

FP = {"model": {"dtype": "float32", "checkpoint": {"sha256": "ab" * 32}}, "pairs": {"n": 2, "sha256": "cd" * 32}, "config": {"layers": [1]}}


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path / "cache"))


def test_resume_with_the_same_fingerprint_keeps_rows_and_start_time(tmp_path):
    out = tmp_path / "run"
    with open_run(out, FP, {"config": {"engine": "fast"}}) as run:
        run.results.append([{"test_id": "t1"}])
        started = run.info["started"]
    time.sleep(1.1)
    with open_run(out, FP, {"config": {"engine": "naive"}}) as run:
        assert run.results.keys == {"t1"} and run.info["started"] == started
        run.finish({"n_tests": 1})
    info = json.loads((out / "run.json").read_text())
    assert info["fingerprint"] == FP and info["config"] == {"engine": "naive"} and info["format_version"] == 2
    assert info["started"] == started and "finished" in info
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "run.json", "run.lock", "summary.json"]


def test_resume_with_another_fingerprint_is_refused_naming_the_fields(tmp_path):
    out = tmp_path / "run"
    with open_run(out, FP, {}) as run:
        run.results.append([{"test_id": "t1"}])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = json.loads(json.dumps(FP))
    other["model"]["dtype"] = "bfloat16"
    other["pairs"]["sha256"] = "ef" * 32
    with pytest.raises(UsageError) as info, open_run(out, other, {}):
        pass
    assert str(info.value) == (
        f'--out {out} holds another experiment, differing in model.dtype ("float32" -> "bfloat16"), '
        'pairs.sha256 ("cdcdcdcdc…dcdcd" -> "efefefefe…fefef"); pass --force-new to start over or choose another --out'
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, the lock released
    with open_run(out, FP, {}):
        pass


def test_force_new_wipes_only_the_runs_files(tmp_path):
    out = tmp_path / "run"
    with open_run(out, FP, {}) as run:
        run.results.append([{"test_id": "t1"}])
        run.validity.append([{"pair_id": "p"}])
        run.finish({})
    (out / "png").mkdir()
    (out / "png" / "heatmap.png").write_bytes(b"png")
    (out / "report.html").write_text("<html>")
    (out / "notes.txt").write_text("mine")
    (out / "pairs.json").write_text("{}")
    other = {**FP, "config": {"layers": [2]}}
    with open_run(out, other, {}, force_new=True) as run:
        assert run.results.keys == set() and run.validity.keys == set()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "pairs.json", "run.json", "run.lock"]
    assert json.loads((out / "run.json").read_text())["fingerprint"] == other


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda out: (out / RESULTS).write_text('{"test_id": "x"}\n'), "holds results but no run.json"),
        (lambda out: (out / "run.json").write_text('{"config": {}}'), "run.json has no fingerprint (written by an older interp)"),
        (lambda out: (out / "run.json").write_text("{"), "run.json is not JSON"),
    ],
)
def test_a_directory_that_is_not_this_run_is_refused(tmp_path, setup, message):
    out = tmp_path / "run"
    out.mkdir()
    setup(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UsageError, match=rf"^--out {out}: {message}; pass --force-new to start over or choose another --out$".replace("(", r"\(").replace(")", r"\)")), open_run(out, FP, {}):
        pass
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "run.lock"} == before


def test_second_writer_in_this_process_is_refused(tmp_path):
    out = tmp_path / "run"
    with open_run(out, FP, {}), pytest.raises(RunError, match=rf"^{out} is being written by process {os.getpid()} on "), open_run(out, FP, {}):
        pass
    with open_run(out, FP, {}):  # released
        pass


def test_second_process_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", (f"import sys, time\nfrom interp.runio import open_run\nwith open_run({str(out)!r}, {FP!r}, {{}}):\n    print('locked', flush=True)\n    sys.stdin.read()\n")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunError, match=rf"^{out} is being written by process {holder.pid} on .*; wait for it to finish or choose another --out$"), open_run(out, FP, {}):
            pass
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    assert not (out / "run.pid").exists()
    with open_run(out, FP, {}):
        pass


def test_fingerprint_diff_names_added_removed_and_nested_fields():
    assert fingerprint_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3, "d": 4}}) == ["a.c (2 -> 3)", "a.d (null -> 4)"]
    assert fingerprint_diff(FP, json.loads(json.dumps(FP))) == []


def test_file_hash_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    digest = file_sha256(f)
    cache = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    assert cache[str(f.resolve())]["sha256"] == digest
    import hashlib

    def no_hashing(*args):
        raise AssertionError("rehashed a file whose size and mtime did not change")

    monkeypatch.setattr(hashlib, "sha256", no_hashing)
    assert file_sha256(f) == digest
    monkeypatch.undo()
    monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path / "cache"))
    f.write_bytes(b"other" * 1000)
    assert file_sha256(f) == hashlib.sha256(b"other" * 1000).hexdigest() != digest


def test_model_fingerprint_follows_content_dtype_and_loading_options(tiny_codi, tmp_path):
    _, base, tok, paths = tiny_codi
    a = model_fingerprint(load_codi(paths["safetensors"], (base, tok), device="cpu"))
    assert a["checkpoint"] == source_fingerprint({"path": str(paths["safetensors"])}, weights=True)
    assert a["checkpoint"]["sha256"] == file_sha256(paths["safetensors"])
    assert (a["dtype"], a["device_type"], a["num_latents"], a["load_options"]["lora_alpha"]) == ("float32", "cpu", 6, 32.0)
    b = model_fingerprint(load_codi(paths["safetensors"], (base, tok), device="cpu", dtype=torch.bfloat16, lora_alpha=16.0, num_latents=4))
    assert [d.split(" ")[0] for d in fingerprint_diff(a, b)] == ["dtype", "load_options.dtype", "load_options.lora_alpha", "load_options.num_latents", "num_latents"]
    copy = tmp_path / "copy" / "model.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(paths["safetensors"].read_bytes())
    c = model_fingerprint(load_codi(copy, (base, tok), device="cpu"))
    assert fingerprint_diff(a, c) == []  # the same content at another path is the same experiment


def test_weights_fingerprint_of_a_model_built_in_memory(tiny_codi):
    """A HookedTransformer holds 0-dim buffers (attention's IGNORE): the weights hash covers them, and
    changes when any parameter does."""
    import torch

    from interp.runio import weights_sha256

    _, base, tok, paths = tiny_codi
    tiny_model = load_codi(paths["safetensors"], (base, tok), device="cpu")
    assert any(t.dim() == 0 for t in tiny_model.model.state_dict().values())
    before = weights_sha256(tiny_model)
    with torch.no_grad():
        p = next(tiny_model.model.parameters())
        orig = p.view(-1)[0].clone()
        p.view(-1)[0] += 1.0
        after = weights_sha256(tiny_model)
        p.view(-1)[0] = orig
    assert before != after and weights_sha256(tiny_model) == before
