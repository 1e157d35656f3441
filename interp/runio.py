"""Run-directory I/O: the fingerprint, the one writer's lock, whole-unit appends, reads that never write.

A run directory is one experiment. Its files (see results/README.md):

    run.json        the fingerprint (what the rows depend on) + config, provenance, start/finish times
    results.jsonl   one row per patch test, keyed by `test_id`
    validity.jsonl  one row per pair, keyed by `pair_id`
    summary.json    written at the end
    run.lock        the writer's lock (`filelock`, an flock on this file); run.pid names its holder

Invariants (each is pinned by a test in tests/unit/test_run_*.py):

- One writer. Every byte written into a run directory is written by the process holding `run.lock`
  (`open_run` acquires it without waiting; a second process is refused with the holder's pid, read
  from `run.pid`, which the holder writes just after acquiring).
- One experiment. `run.json["fingerprint"]` holds everything the rows depend on (model content or hub
  id, dtype, device type, loading options, versions, the pairs' content hash, the sweep config);
  resuming with any difference is refused naming the differing fields. `force_new` wipes the run's
  files (only those named above, under the lock) and starts over.
- Each key once. `JsonlAppender.append` writes only rows whose key is not yet in the file, all of
  them in one `os.write` loop followed by `fsync`; an `OSError` part-way (a full disk) truncates the
  file back to where the write began. Rows are strict JSON: a non-finite float is written as null.
- Reads never write. `read_jsonl` ignores the bytes after the last newline (a write cut short by a
  kill); only a lock holder about to append truncates them (`os.ftruncate` to the last newline, one
  system call, so a kill leaves the tail either whole or gone). Whatever moment a writer is killed
  at, the file holds whole rows plus at most one torn tail, no key twice, and a resumed run
  recomputes exactly the rows that are missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

RUN_JSON, RESULTS, VALIDITY, SUMMARY = "run.json", "results.jsonl", "validity.jsonl", "summary.json"
LOCK, PID = "run.lock", "run.pid"
#: the files a run owns: `force_new` removes exactly these (and their temporary files), nothing else
ANALYSIS = "analysis.json"  # an analysis run's results (interp.analysis.run)
ATTRIBUTION = "attribution.jsonl"  # an attribution run's rows (interp.attribution_run)
RUN_FILES = (RESULTS, VALIDITY, SUMMARY, ANALYSIS, ATTRIBUTION, RUN_JSON, "report.html")
FORMAT_VERSION = 2
HASH_CHUNK = 1 << 22


class UsageError(ValueError):
    """An argument, input file or output directory that cannot be used as given (CLI exit status 2)."""


class CorruptFileError(ValueError):
    """A run file whose whole lines are not all JSON objects: not something a killed writer leaves (exit status 2)."""


class RunError(RuntimeError):
    """A run that cannot proceed although its arguments are fine, e.g. another process holds it (exit status 1)."""


# ----------------------------------------------------------------------------- JSON


def finite(obj: Any) -> Any:
    """`obj` as strict JSON data: non-finite floats become None, numpy scalars and paths plain values."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return finite(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (`allow_nan=False`) of `finite(obj)`: never `NaN` or `Infinity`."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as strict JSON to a temporary file, fsync it and rename it over `path`.

    A reader sees the old file or the new one, never part of one; on failure (a full disk) the
    temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(dumps(obj, indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


# ----------------------------------------------------------------------------- JSONL


def scan_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(rows, end): the rows of the whole lines of `path` and the byte offset just after the last newline.

    Bytes after `end` are a torn write and are not rows. A whole line that is not a JSON object
    raises ValueError naming the file and line. A missing file is ([], 0). Never writes.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1
    rows = []
    for i, line in enumerate(data[:end].splitlines()):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if not isinstance(row, dict):
            raise CorruptFileError(f"{path} line {i + 1} is not a JSON object; the file was changed by hand or another program: restore it or start over with --force-new")
        rows.append(row)
    return rows, end


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file, a torn last line (a write cut short) ignored. Never writes."""
    return scan_jsonl(path)[0]


def unique_rows(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[dict[str, Any]], int]:
    """(the rows with the first row of each `key` value kept, how many repeats were dropped).

    Rows without `key` (built by hand, not read from a run) are all kept.
    """
    seen: set[Any] = set()
    kept = []
    for row in rows:
        if key not in row or row[key] not in seen:
            seen.add(row.get(key))
            kept.append(row)
    return kept, len(rows) - len(kept)


def _write_all(fd: int, data: bytes) -> None:
    """`os.write` until every byte is written (a write may be short); raises what os.write raises."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass
class JsonlAppender:
    """Appends batches of rows to one JSONL file, each `key` value at most once. Only a lock holder makes one.

    `keys` mirrors the keys on disk: it is read once when the appender is made and updated after
    each successful append (the lock guarantees nobody else writes the file meanwhile).
    """

    path: Path
    key: str
    keys: set[Any] = field(init=False)
    _end: int = field(init=False)
    _repaired: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        rows, self._end = scan_jsonl(self.path)
        self.keys = {r[self.key] for r in rows}

    def append(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append the rows whose key is not in the file yet, in one write + fsync; returns them.

        Rows already on disk (a unit cut short after its first rows, recomputed on resume) are
        skipped, so no key is ever written twice. Two rows with one key in `rows` is a bug: ValueError.
        On an OSError (disk full) the file is truncated back to where this write began and the
        error is raised: the file then holds exactly the rows it held before.
        """
        batch = [r[self.key] for r in rows]
        if len(set(batch)) != len(batch):
            raise ValueError(f"rows to append to {self.path.name} repeat a {self.key}: {next(k for k in batch if batch.count(k) > 1)!r}")
        new = [r for r in rows if r[self.key] not in self.keys]
        if not new:
            return []
        data = "".join(dumps(r) + "\n" for r in new).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if not self._repaired:  # the torn tail of a killed writer goes before our first row
                if os.fstat(fd).st_size > self._end:
                    os.ftruncate(fd, self._end)
                self._repaired = True
            start = os.fstat(fd).st_size
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except OSError:
                with suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        self.keys.update(r[self.key] for r in new)
        return new


# ----------------------------------------------------------------------------- fingerprint


def versions() -> dict[str, str]:
    """Installed versions of what a result depends on (package metadata: transformer-lens has no __version__)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("interp", "torch", "transformer-lens", "transformers", "numpy"):
        try:
            out[dist.replace("-", "_")] = version(dist)
        except PackageNotFoundError:
            out[dist.replace("-", "_")] = "not installed"
    return out


def cache_dir() -> Path:
    """Where file hashes are cached: $INTERP_CACHE_DIR, else $XDG_CACHE_HOME/interp, else ~/.cache/interp."""
    if os.environ.get("INTERP_CACHE_DIR"):
        return Path(os.environ["INTERP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "interp"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, streamed; cached on disk by (absolute path, size, mtime_ns).

    A file rewritten in place gets a new mtime and is hashed again. The cache is best effort: an
    unwritable cache directory only costs rehashing.
    """
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    cache_file = cache_dir() / "sha256.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(str(path)) if isinstance(cache, dict) else None
    if isinstance(hit, dict) and hit.get("stamp") == stamp:
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with suppress(OSError):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache = cache if isinstance(cache, dict) else {}
        cache[str(path)] = {"stamp": stamp, "sha256": digest}
        atomic_write_json(cache_file, cache)
    return digest


def path_sha256(path: Path) -> str:
    """sha256 of a file, or of a directory's regular files (recursively, by relative name and content)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


#: files a base directory contributes nothing to (the checkpoint holds every weight of the network)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")


def source_fingerprint(source: Any, *, weights: bool) -> dict[str, Any]:
    """What a checkpoint or base in `load_options` refers to, by content.

    A hub download: `{"repo_id", "commit"}` (the commit names the content); a local file or
    directory: `{"sha256"}` of it (a base directory without its weight files when `weights` is
    False: only its config and tokenizer are read); anything else (an in-memory state_dict or
    model): `{"given": str(source)}`, the weights then being fingerprinted by `weights_sha256`.
    """
    if isinstance(source, dict) and source.get("repo_id") and source.get("commit"):
        return {"repo_id": source["repo_id"], "commit": source["commit"]}
    path = Path(source["path"]) if isinstance(source, dict) and source.get("path") else None
    if path is None or not path.exists():
        return {"given": str(source)}
    if path.is_dir() and not weights:
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.endswith(WEIGHT_SUFFIXES)):
            h.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
        return {"sha256": h.hexdigest()}
    return {"sha256": path_sha256(path)}


def weights_sha256(model: Any) -> str:
    """sha256 over the loaded network's parameters and the projection's, by name (shape, dtype, bytes)."""
    import torch

    h = hashlib.sha256()
    for prefix, module in (("model.", model.model), ("prj.", model.prj)):
        for name, p in sorted(module.state_dict().items()):
            t = p.detach().cpu().contiguous()
            h.update(f"{prefix}{name}\0{tuple(t.shape)}\0{t.dtype}\n".encode())
            # reshape(-1): a 0-dim tensor's bytes too (attention's IGNORE buffer); the same bytes otherwise
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: Any) -> dict[str, Any]:
    """The model part of a fingerprint: the checkpoint's and base's content, dtype, device type,
    latents, LoRA, context, and every loading option the model records (`model.load_options`).

    A model whose checkpoint is not a file (built in memory, loaded from a state_dict) is
    fingerprinted by its loaded weights (`weights_sha256`) instead.
    """
    options = finite(dict(model.load_options))
    checkpoint = source_fingerprint(options.get("checkpoint"), weights=True)
    if "given" in checkpoint:
        checkpoint["weights_sha256"] = weights_sha256(model)
    return {
        "checkpoint": checkpoint,
        "base": source_fingerprint(options.get("base"), weights=False),
        "dtype": str(model.cfg.dtype).removeprefix("torch."),
        "device_type": model.device.type,
        "num_latents": model.num_latents,
        "answer_prefix": model.answer_prefix,
        "lora": finite(model.lora),
        "n_layers": model.cfg.n_layers,
        "d_model": model.cfg.d_model,
        "n_ctx": model.cfg.n_ctx,
        "load_options": {k: v for k, v in options.items() if k not in ("checkpoint", "base")},
    }


def pairs_sha256(pairs: Sequence[Any]) -> str:
    """sha256 of the pairs' canonical JSON (order matters: the pair index is part of a unit)."""
    return hashlib.sha256(dumps([p.to_dict() for p in pairs], sort_keys=True).encode()).hexdigest()


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: leaf} (an empty dict is a leaf)."""
    if isinstance(d, dict) and d:
        return {k: v for key, value in d.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): d}


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted fields where two fingerprints differ, each as `field (old -> new)`, values shortened."""

    def short(v: Any) -> str:
        s = json.dumps(v)
        return s if len(s) <= 24 else s[:10] + "…" + s[-6:]

    a, b = flatten(old), flatten(new)
    return [f"{k} ({short(a.get(k))} -> {short(b.get(k))})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ----------------------------------------------------------------------------- the run directory


def check_output_dir(out: str | Path) -> Path:
    """Refuse an output path that cannot become a run directory, before anything is written.

    Accepted: an existing directory we can write to, or a new path whose nearest existing parent is
    a writable directory. Raises UsageError naming the path.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory; accepted: a directory (new or a run to resume)")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--out {out}: {probe} is not a directory; accepted: a path under a writable directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {probe} is not writable; accepted: a path under a writable directory")
    try:  # permissions alone do not say it (root, read-only or virtual file systems): try an unnamed file
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UsageError(f"--out {out}: {probe} is not writable ({exc.strerror}); accepted: a path under a writable directory") from None
    return out


@dataclass
class Run:
    """An open run directory whose lock this process holds (see `open_run`)."""

    path: Path
    info: dict[str, Any]
    results: JsonlAppender
    validity: JsonlAppender

    def finish(self, summary: dict[str, Any] | None) -> None:
        """Write summary.json (when given), then run.json with its finish time."""
        if summary is not None:
            atomic_write_json(self.path / SUMMARY, summary)
        self.info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.path / RUN_JSON, self.info)


def _holder(out: Path) -> str:
    try:
        who = json.loads((out / PID).read_text())
        return f"process {who['pid']} on {who['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its pid is not written yet)"


def _wipe(out: Path) -> None:
    """Remove the run's own files (RUN_FILES, their temporary files, png/*.png); nothing else."""
    for name in RUN_FILES:
        for p in (out / name, out / f".{name}.tmp"):
            with suppress(FileNotFoundError):
                p.unlink()
    png = out / "png"
    if png.is_dir():
        for p in png.glob("*.png"):
            p.unlink()
        with suppress(OSError):
            png.rmdir()


@contextmanager
def open_run(out: str | Path, fingerprint: dict[str, Any], info: dict[str, Any], *, force_new: bool = False) -> Iterator[Run]:
    """Lock `out`, check or write its fingerprint, and yield the `Run`; the lock is released on exit.

    `info` is the rest of run.json (config, provenance ...). A directory holding another experiment
    (a different fingerprint, results without run.json, a run.json of an older format) raises
    UsageError naming the differing fields, unless `force_new`, which wipes the run's files first.
    A directory locked by another process raises RunError naming it.
    """
    out = check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunError(f"{out} is being written by {_holder(out)}; wait for it to finish or choose another --out") from None
    try:
        (out / PID).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        if force_new:
            _wipe(out)
        run_path = out / RUN_JSON
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        if run_path.exists():
            try:
                previous = json.loads(run_path.read_text())
            except ValueError:
                raise UsageError(f"--out {out}: run.json is not JSON; pass --force-new to start over or choose another --out") from None
            if "fingerprint" not in previous:
                raise UsageError(f"--out {out}: run.json has no fingerprint (written by an older interp); pass --force-new to start over or choose another --out")
            diff = fingerprint_diff(previous["fingerprint"], fingerprint)
            if diff:
                raise UsageError(f"--out {out} holds another experiment, differing in {', '.join(diff)}; pass --force-new to start over or choose another --out")
            started = previous.get("started", started)
        elif any((out / name).exists() for name in (RESULTS, VALIDITY, ANALYSIS, ATTRIBUTION)):
            raise UsageError(f"--out {out}: holds results but no run.json; pass --force-new to start over or choose another --out")
        run_info = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, **info, "started": started}
        atomic_write_json(run_path, run_info)
        yield Run(out, run_info, JsonlAppender(out / RESULTS, "test_id"), JsonlAppender(out / VALIDITY, "pair_id"))
    finally:
        with suppress(OSError):
            (out / PID).unlink()
        lock.release()
