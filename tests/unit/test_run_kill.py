"""Killed at any moment or out of disk space: no finished row lost, none doubled, the run resumes.

Kills are simulated in-process at random byte offsets of the appends (fixed seed): the write
hook writes the bytes a killed process would have written and raises `Killed`, a BaseException
the appender does not catch, as a real SIGKILL leaves no handler a chance to run. Some resumes are
killed inside the torn-tail truncation, before or after it. One real SIGKILL of `interp patch`
checks the same on a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from interp import load_codi
from interp.cli import main
from interp.data import save_pairs
from interp.data.arithmetic import arithmetic_pairs
from interp.runio import read_jsonl
from interp.sweep import SweepConfig, run_sweep

CONFIG = SweepConfig(kinds=("single",), layers=(1,), strategies=("parallel", "iterative"), bootstrap=50)
COMPARED = ("logit_diff", "normalized_effect", "kl", "patched_answer")


class Killed(BaseException):
    """What a SIGKILL does to the process: it stops right here."""


@pytest.fixture(scope="module")
def model(tiny_codi):
    _, base, tok, paths = tiny_codi
    return load_codi(paths["bin"], (base, tok), device="cpu")


def _in(fd: int, run_dir) -> bool:
    return os.readlink(f"/proc/self/fd/{fd}").startswith(str(run_dir))


def kill_after(monkeypatch, run_dir, budget: int, truncate: str | None) -> None:
    """Let the next `budget` bytes written into run_dir through os.write land, then kill;
    `truncate` "before"/"after": kill at the torn-tail truncation instead, before or after it."""
    real_write, real_truncate = os.write, os.ftruncate
    left = [budget]

    def write(fd, data):
        if not _in(fd, run_dir):
            return real_write(fd, data)
        if len(data) <= left[0]:
            left[0] -= len(data)
            return real_write(fd, data)
        real_write(fd, bytes(data[: left[0]]))
        raise Killed

    def ftruncate(fd, length):
        if truncate == "after":
            real_truncate(fd, length)
        if truncate is not None and _in(fd, run_dir):
            raise Killed
        real_truncate(fd, length)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "ftruncate", ftruncate)


def _rows_by_id(path):
    rows = read_jsonl(path)
    ids = [r["test_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a test id was written twice"
    return {r["test_id"]: r for r in rows}


def _same_rows(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for tid, row in want.items():
        for key in COMPARED:
            assert got[tid][key] == pytest.approx(row[key], abs=1e-5), (tid, key)


def test_killed_at_random_bytes_and_truncations_resumes_to_the_uninterrupted_rows(model, tmp_path, monkeypatch):
    pairs = arithmetic_pairs(1, seed=3)
    run_sweep(model, pairs, tmp_path / "fresh", CONFIG, progress=False)
    fresh = _rows_by_id(tmp_path / "fresh" / "results.jsonl")
    total = sum((tmp_path / "fresh" / f).stat().st_size for f in ("results.jsonl", "validity.jsonl"))

    rng = random.Random(0)
    out = tmp_path / "run"
    kills = truncation_kills = 0
    for _ in range(12):
        torn = (out / "results.jsonl").exists() and not (out / "results.jsonl").read_bytes().endswith(b"\n")
        truncate = rng.choice(["before", "after", None]) if torn else None
        kill_after(monkeypatch, out, rng.randrange(1, total // 3), truncate)
        try:
            run_sweep(model, pairs, out, CONFIG, progress=False)
        except Killed:
            kills += 1
            truncation_kills += truncate is not None
            _rows_by_id(out / "results.jsonl")  # after every kill: whole rows, each id at most once
            continue
        finally:
            monkeypatch.undo()
        break
    else:
        run_sweep(model, pairs, out, CONFIG, progress=False)
    assert kills >= 4 and truncation_kills >= 1, (kills, truncation_kills)
    data = (out / "results.jsonl").read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == len(fresh)
    _same_rows(_rows_by_id(out / "results.jsonl"), fresh)
    assert [v["pair_id"] for v in read_jsonl(out / "validity.jsonl")] == [pairs[0].id]
    assert json.loads((out / "summary.json").read_text())["n_tests"] == len(fresh)


def test_full_disk_mid_unit_then_resume(model, tmp_path, monkeypatch):
    pairs = arithmetic_pairs(1, seed=3)
    out = tmp_path / "run"
    real_write = os.write
    seen = [0]

    def full_after_two_units(fd, data):
        if _in(fd, out) and os.readlink(f"/proc/self/fd/{fd}").endswith("results.jsonl"):
            seen[0] += 1
            if seen[0] == 3:  # the third unit: part of it fits, then the disk is full
                real_write(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_after_two_units)
    with pytest.raises(OSError, match="No space left on device"):
        run_sweep(model, pairs, out, CONFIG, progress=False)
    monkeypatch.undo()
    data = (out / "results.jsonl").read_bytes()
    assert data.count(b"\n") == 4 and data.endswith(b"\n")  # two whole units, the third rolled back
    assert not (out / "summary.json").exists()
    run_sweep(model, pairs, out, CONFIG, progress=False)
    run_sweep(model, pairs, tmp_path / "fresh", CONFIG, progress=False)
    _same_rows(_rows_by_id(out / "results.jsonl"), _rows_by_id(tmp_path / "fresh" / "results.jsonl"))


def test_sigkill_of_interp_patch_resumes_to_the_uninterrupted_rows(tmp_path, capsys):
    pairs_file = tmp_path / "pairs.json"
    save_pairs(pairs_file, arithmetic_pairs(2, seed=5), {"source": "test"})
    args = ["patch", "--pairs", str(pairs_file), "--layers", "0,1,2,3", "--kinds", "single", "--strategy", "parallel,iterative"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "interp.cli", *args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not results.exists() or results.read_bytes().count(b"\n") < 8):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    landed = results.read_bytes().count(b"\n")
    assert 8 <= landed < 2 * 4 * 6 * 2, landed  # killed mid-sweep
    main([*args, "--out", str(out)])
    main([*args, "--out", str(tmp_path / "fresh")])
    capsys.readouterr()
    _same_rows(_rows_by_id(results), _rows_by_id(tmp_path / "fresh" / "results.jsonl"))
