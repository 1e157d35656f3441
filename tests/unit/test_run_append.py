"""Appends and reads of run files (interp.runio): whole units, each id once, torn tails, full disks."""

from __future__ import annotations

import errno
import json
import os

import pytest

from interp.runio import (
    CorruptFileError,
    JsonlAppender,
    atomic_write_json,
    read_jsonl,
    scan_jsonl,
    unique_rows,
)

A = {"test_id": "a", "x": 1.5}
B = {"test_id": "b", "x": -2}
C = {"test_id": "c", "x": None}
LINE = {r["test_id"]: (json.dumps(r) + "\n").encode() for r in (A, B, C)}


def test_append_writes_whole_rows_as_strict_json(tmp_path):
    path = tmp_path / "results.jsonl"
    app = JsonlAppender(path, "test_id")
    assert app.append([A, B]) == [A, B]
    assert path.read_bytes() == LINE["a"] + LINE["b"]
    row = {"test_id": "d", "kl": float("inf"), "effect": float("nan"), "cos": [1.0, float("-inf")]}
    app.append([row])
    assert path.read_bytes().splitlines()[-1] == b'{"test_id": "d", "kl": null, "effect": null, "cos": [1.0, null]}'
    assert read_jsonl(path)[-1] == {"test_id": "d", "kl": None, "effect": None, "cos": [1.0, None]}


def test_rows_already_on_disk_are_not_written_again(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(LINE["a"])
    app = JsonlAppender(path, "test_id")
    assert app.append([A, B]) == [B]  # the unit's first row landed before a kill; only the rest is new
    assert app.append([B, C]) == [C]
    assert app.append([A, B, C]) == []
    assert path.read_bytes() == LINE["a"] + LINE["b"] + LINE["c"]
    with pytest.raises(ValueError, match="rows to append to results.jsonl repeat a test_id: 'd'"):
        app.append([{"test_id": "d"}, {"test_id": "d"}])
    assert path.read_bytes() == LINE["a"] + LINE["b"] + LINE["c"]


def test_reads_ignore_a_torn_tail_and_never_write(tmp_path):
    path = tmp_path / "results.jsonl"
    torn = LINE["a"] + LINE["b"][:7]
    path.write_bytes(torn)
    before = os.stat(path)
    assert read_jsonl(path) == [A]
    assert scan_jsonl(path) == ([A], len(LINE["a"]))
    # a complete JSON object without its newline is a torn write too: the unit's write was cut short
    path.write_bytes(LINE["a"] + LINE["b"].rstrip(b"\n"))
    assert read_jsonl(path) == [A]
    path.write_bytes(torn)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    JsonlAppender(path, "test_id")  # opening an appender reads only
    assert path.read_bytes() == torn and os.stat(path).st_mtime_ns == before.st_mtime_ns
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_the_writer_truncates_the_torn_tail_before_its_first_append(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(LINE["a"] + LINE["b"][:7])
    app = JsonlAppender(path, "test_id")
    assert app.append([A]) == []  # nothing new: nothing written, the tail left alone
    assert path.read_bytes() == LINE["a"] + LINE["b"][:7]
    app.append([B])
    assert path.read_bytes() == LINE["a"] + LINE["b"]


def test_a_corrupt_whole_line_is_an_error_naming_it(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(LINE["a"] + b"garbage\n" + LINE["b"])
    with pytest.raises(CorruptFileError, match=r"results.jsonl line 2 is not a JSON object; .* start over with --force-new$"):
        read_jsonl(path)
    path.write_bytes(LINE["a"] + b"[1, 2]\n")
    with pytest.raises(CorruptFileError, match="line 2 is not a JSON object"):
        read_jsonl(path)


def test_full_disk_mid_unit_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    path.write_bytes(LINE["a"] + LINE["b"][:5])  # a torn tail from an earlier kill, too
    app = JsonlAppender(path, "test_id")
    real_write = os.write
    calls = []

    def full_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:9]))  # a short write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError) as info:
        app.append([B, C])
    assert info.value.errno == errno.ENOSPC and len(calls) == 2
    assert path.read_bytes() == LINE["a"]  # tail truncated, the partial unit rolled back
    assert read_jsonl(path) == [A] and app.keys == {"a"}
    monkeypatch.setattr(os, "write", real_write)
    assert app.append([B, C]) == [B, C]  # space freed: the same unit lands whole
    assert path.read_bytes() == LINE["a"] + LINE["b"] + LINE["c"]


def test_full_disk_on_fsync_rolls_back_too(tmp_path, monkeypatch):
    path = tmp_path / "validity.jsonl"
    app = JsonlAppender(path, "test_id")
    app.append([A])

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left on device"):
        app.append([B])
    assert path.read_bytes() == LINE["a"]


def test_atomic_write_json_is_strict_and_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"ci": float("nan"), "n": 1})
    assert path.read_text() == '{\n  "ci": null,\n  "n": 1\n}'

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        atomic_write_json(path, {"n": 2})
    assert path.read_text() == '{\n  "ci": null,\n  "n": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_unique_rows_keeps_the_first_of_each_id():
    rows, dropped = unique_rows([A, B, {"test_id": "a", "x": 9}, C, B], "test_id")
    assert rows == [A, B, C] and dropped == 2
    assert unique_rows([{"x": 1}, {"x": 1}, A], "test_id") == ([{"x": 1}, {"x": 1}, A], 0)  # hand-built rows: no id to compare
