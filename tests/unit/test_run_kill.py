"""Killed at any moment or out of disk space: no finished row lost, none doubled, the run resumes.

The sweep's orchestration and file I/O run for real (`run_sweep` on the embedded model: checks,
fingerprint, lock, appends, summary); its compute (`trace_pair`, `validity_checks`, the engine) is
replaced by `stub_engine`, whose rows are a pure function of the unit, so that a resumed run must
reproduce every line of an uninterrupted run's results.jsonl byte for byte (in its own order: a
resume batches the remaining units differently), and many kills fit in seconds.
(The engine's own resume equality is tests/unit/test_sweep.py's.)

Kills are simulated in-process at random byte offsets of the appends (fixed seed): the write hook
writes the bytes a killed process would have written and raises `Killed`, a BaseException the
appender does not catch, as a SIGKILL leaves no handler a chance to run. Some resumes are killed
inside the torn-tail truncation, before or after it. Two subprocesses are killed by a real SIGKILL,
sent to themselves at a byte offset and at the truncation.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from interp.data.arithmetic import arithmetic_pairs
from interp.runio import read_jsonl
from interp.sweep import SweepConfig, run_sweep

sweep = importlib.import_module("interp.sweep")  # the module (`interp.sweep` is also the in-memory sweep function)

CONFIG = SweepConfig(kinds=("single", "all"), strategies=("parallel", "iterative"), bootstrap=20)
REPO = Path(__file__).resolve().parents[2]


class Killed(BaseException):
    """What a SIGKILL does to the process: it stops right here."""


def stub_engine(setattr_) -> None:
    """Replace the sweep's compute with stand-ins whose rows depend only on the unit (few units per batch)."""

    def rows(group, batch, config, *_):
        out = []
        for g, u in batch:
            pair, hook = group[g].pair, config.hook_name(u.layer)
            unit = []
            for s in config.strategies:
                test_id = u.test_id(pair.id, hook, s)
                value = int(hashlib.sha256(test_id.encode()).hexdigest()[:6], 16) / 2**24
                unit.append(
                    {
                        "test_id": test_id,
                        "pair_id": pair.id,
                        "hook": hook,
                        "layer": u.layer,
                        "kind": u.kind,
                        "latents": list(u.latents),
                        "strategy": s,
                        "normalized_effect": value,
                        "logit_diff": value,
                        "kl": None,
                        "flip": value > 0.5,
                        "pad": "x" * 150,
                    }
                )
            out.append(unit)
        return out

    setattr_(sweep, "trace_pair", lambda model, pair, **_: SimpleNamespace(pair=pair))
    setattr_(sweep, "validity_checks", lambda model, pt, strategies: {"pair_id": pt.pair.id, "checks": {"nothing_is_corrupted/parallel": {"max_abs_diff": 0.0, "passed": True}}, "passed": True})
    setattr_(sweep, "sweep_patcher", lambda *args: SimpleNamespace(batch_size=3))
    setattr_(sweep, "run_units", lambda patcher, group, batch, config, *rest: rows(group, batch, config))


def _in(fd: int, run_dir: Path) -> bool:
    return os.readlink(f"/proc/self/fd/{fd}").startswith(str(run_dir))


def kill_after(setattr_, run_dir: Path, budget: int, truncate: str | None, kill) -> None:
    """Let the next `budget` bytes written into run_dir through os.write land, then `kill()`;
    `truncate` "before"/"after": kill at the torn-tail truncation instead, before or after it."""
    real_write, real_truncate = os.write, os.ftruncate
    left = [budget]

    def write(fd, data):
        if not _in(fd, run_dir) or len(data) <= left[0]:
            left[0] -= len(data) if _in(fd, run_dir) else 0
            return real_write(fd, data)
        real_write(fd, bytes(data[: left[0]]))
        kill()

    def ftruncate(fd, length):
        if truncate is not None and _in(fd, run_dir):
            if truncate == "after":
                real_truncate(fd, length)
            kill()
        real_truncate(fd, length)

    setattr_(os, "write", write)
    setattr_(os, "ftruncate", ftruncate)


def _raise_killed():
    raise Killed


def sigkill_self():
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def model():
    from interp import load_default

    return load_default("aligned")


@pytest.fixture(scope="module")
def pairs():
    return arithmetic_pairs(2, seed=3)


@pytest.fixture
def uninterrupted(model, pairs, tmp_path, monkeypatch):
    stub_engine(monkeypatch.setattr)
    run_sweep(model, pairs, tmp_path / "fresh", CONFIG, progress=False)
    return (tmp_path / "fresh" / "results.jsonl").read_bytes()


def same_lines(a: bytes, b: bytes) -> bool:
    """The same rows, byte for byte, in any order."""
    return sorted(a.splitlines(keepends=True)) == sorted(b.splitlines(keepends=True))


def _check_no_repeats(path: Path) -> None:
    ids = [r["test_id"] for r in read_jsonl(path)]
    assert len(ids) == len(set(ids)), "a test id was written twice"


def test_killed_at_random_bytes_and_truncations_resumes_to_the_uninterrupted_bytes(model, pairs, tmp_path, monkeypatch, uninterrupted):
    rng = random.Random(0)
    out = tmp_path / "run"
    kills = truncation_kills = 0
    for _ in range(40):
        results = out / "results.jsonl"
        torn = results.exists() and not results.read_bytes().endswith(b"\n")
        truncate = rng.choice(["before", "after", None]) if torn else None
        with monkeypatch.context() as m:
            kill_after(m.setattr, out, rng.randrange(1, len(uninterrupted) // 6), truncate, _raise_killed)
            try:
                run_sweep(model, pairs, out, CONFIG, progress=False)
                break
            except Killed:
                kills += 1
                truncation_kills += truncate is not None
        _check_no_repeats(results)  # after every kill: whole rows, each id at most once
    assert kills >= 8 and truncation_kills >= 2, (kills, truncation_kills)
    assert same_lines((out / "results.jsonl").read_bytes(), uninterrupted)
    assert [v["pair_id"] for v in read_jsonl(out / "validity.jsonl")] == [p.id for p in pairs]
    assert json.loads((out / "summary.json").read_text())["n_tests"] == uninterrupted.count(b"\n")


def test_full_disk_mid_unit_then_resume(model, pairs, tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    real_write = os.write
    units_written = [0]

    def full_on_the_third_unit(fd, data):
        if _in(fd, out) and os.readlink(f"/proc/self/fd/{fd}").endswith("results.jsonl"):
            units_written[0] += 1
            if units_written[0] == 3:  # part of it fits, then the disk is full
                real_write(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    with monkeypatch.context() as m:
        m.setattr(os, "write", full_on_the_third_unit)
        with pytest.raises(OSError, match="No space left on device"):
            run_sweep(model, pairs, out, CONFIG, progress=False)
    data = (out / "results.jsonl").read_bytes()
    assert data == b"".join(uninterrupted.splitlines(keepends=True)[:4])  # two whole units; the third rolled back
    assert not (out / "summary.json").exists() and not (out / "run.pid").exists()
    run_sweep(model, pairs, out, CONFIG, progress=False)
    assert same_lines((out / "results.jsonl").read_bytes(), uninterrupted)


SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.unit import test_run_kill as t
from interp import load_default
from interp.data.arithmetic import arithmetic_pairs
t.stub_engine(setattr)
t.kill_after(setattr, Path({out!r}), {budget}, {truncate!r}, t.sigkill_self)
t.run_sweep(load_default("aligned"), arithmetic_pairs(2, seed=3), {out!r}, t.CONFIG, progress=False)
"""


def test_real_sigkill_mid_append_and_mid_truncation_then_resume(model, pairs, tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    for budget, truncate in ((len(uninterrupted) // 3 + 17, None), (10**9, "before")):
        proc = subprocess.run([sys.executable, "-c", SCRIPT.format(repo=str(REPO), out=str(out), budget=budget, truncate=truncate)], capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        data = (out / "results.jsonl").read_bytes()
        assert not data.endswith(b"\n") and uninterrupted.startswith(data)  # killed mid-row; the torn tail still there
        _check_no_repeats(out / "results.jsonl")
    run_sweep(model, pairs, out, CONFIG, progress=False)  # the lock died with its holder
    assert same_lines((out / "results.jsonl").read_bytes(), uninterrupted)
