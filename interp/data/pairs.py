"""The clean/corrupted problem pair shared by every data source, and its versioned JSON file.

A pair's two answers are of one kind: numbers (arithmetic, GSM8K; stored as JSON numbers, read as
floats) or text (ProsQA's "Tom is a lempus."; stored and read as strings). A file mixing the two
in one pair is refused as malformed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "interp-pairs"
VERSION = 1
_PAIR_FIELDS = ("id", "clean_question", "corrupted_question", "clean_answer", "corrupted_answer", "change")
_CHANGE_FIELDS = ("old", "new", "span")


@dataclass(frozen=True)
class NumberChange:
    """The one number (or, for text tasks such as ProsQA, the one word) that differs between the
    clean and the corrupted question.

    `span` is the (start, end) character span of `old` in the clean question; `new` sits at
    `(start, start + len(new))` in the corrupted question.
    """

    old: str
    new: str
    span: tuple[int, int]


@dataclass(frozen=True)
class Pair:
    """Two prompts that differ in one number (or word) and have different answers.

    `clean_intermediates` / `corrupted_intermediates`: the value after each step of each side's
    solution (the last one is the answer; empty when the source does not know them);
    `changed_slot`: which number of the problem the corrupted side changed (the source's own
    numbering: arithmetic 0 = x0 and i = operand i, GSM8K the question number's index,
    three-step 0/1/2 = X/Y/Z), None when unknown.
    """

    id: str
    clean_question: str
    corrupted_question: str
    clean_answer: float | str
    corrupted_answer: float | str
    change: NumberChange
    source: dict[str, Any] = field(default_factory=dict)
    clean_intermediates: tuple[float, ...] = ()
    corrupted_intermediates: tuple[float, ...] = ()
    changed_slot: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["change"]["span"] = list(self.change.span)
        d["clean_intermediates"], d["corrupted_intermediates"] = list(self.clean_intermediates), list(self.corrupted_intermediates)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pair:
        change = d["change"]
        return cls(
            id=str(d["id"]),
            clean_question=d["clean_question"],
            corrupted_question=d["corrupted_question"],
            **_answers(d["clean_answer"], d["corrupted_answer"]),
            change=NumberChange(change["old"], change["new"], tuple(change["span"])),
            source=dict(d.get("source", {})),
            **_intermediates(d),
        )


def _answers(clean: Any, corrupted: Any) -> dict[str, float | str]:
    """Both answers as text when both are strings, else both as floats (ValueError if only one is text)."""
    if isinstance(clean, str) and isinstance(corrupted, str):
        return {"clean_answer": clean, "corrupted_answer": corrupted}
    if isinstance(clean, str) or isinstance(corrupted, str):
        raise ValueError(f"answers {clean!r} and {corrupted!r} mix text and number; both must be numbers or both text")
    return {"clean_answer": float(clean), "corrupted_answer": float(corrupted)}


def _show(answer: float | str) -> str:
    return repr(answer) if isinstance(answer, str) else f"{answer:g}"


def _intermediates(d: dict[str, Any]) -> dict[str, Any]:
    """The intermediate-value fields of a pair record; files written before they existed carry
    them in `source` (arithmetic: `clean_values`, `changed_slot`; GSM8K: `chain`, `number_index`)."""
    if "clean_intermediates" in d:
        slot = d.get("changed_slot")
        return {
            "clean_intermediates": tuple(float(v) for v in d["clean_intermediates"]),
            "corrupted_intermediates": tuple(float(v) for v in d.get("corrupted_intermediates", ())),
            "changed_slot": None if slot is None else int(slot),
        }
    source = d.get("source", {})
    if "clean_values" in source:
        return {
            "clean_intermediates": tuple(float(v) for v in source["clean_values"]),
            "corrupted_intermediates": tuple(float(v) for v in source["corrupted_values"]),
            "changed_slot": source.get("changed_slot"),
        }
    if "chain" in source:
        return {
            "clean_intermediates": tuple(float(s["result"]) for s in source["chain"]),
            "corrupted_intermediates": tuple(float(s["corrupted_result"]) for s in source["chain"]),
            "changed_slot": source.get("number_index"),
        }
    return {}


def save_pairs(path: str | Path, pairs: Iterable[Pair], meta: dict[str, Any]) -> None:
    """Write `{"format": "interp-pairs", "version": 1, "meta": meta, "pairs": [...]}` to `path`.

    `meta` should say where the pairs came from (source, seed, stage counts ...) and must be
    JSON-serializable. The file is written to a temporary file next to `path` and moved into
    place, so a reader never sees half a file. Raises ValueError for a pair whose answers are
    equal (`load_pairs` would refuse it) or a non-finite number.
    """
    path = Path(path)
    records = [p.to_dict() for p in pairs]
    for i, d in enumerate(records):
        if d["clean_answer"] == d["corrupted_answer"]:
            raise ValueError(f"pair #{i} ({d['id']!r}) has equal answers ({d['clean_answer']}); drop it before saving")
    try:
        text = json.dumps({"format": FORMAT, "version": VERSION, "meta": meta, "pairs": records}, indent=1, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot write {path}: meta or pairs are not plain finite JSON ({e})") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_pairs(path: str | Path) -> tuple[list[Pair], dict[str, Any]]:
    """Read a file written by `save_pairs`: (pairs, meta).

    Raises ValueError naming the problem and the fix when the file is not JSON, is not a pairs
    file, has another version, or holds a malformed pair or one whose answers are equal.
    """
    path = Path(path)
    regenerate = "regenerate it with interp.data.save_pairs"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e}); expected a pairs file, {regenerate}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        tag = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a pairs file: format tag {tag!r}, expected {FORMAT!r}; {regenerate}")
    if "version" not in data:
        raise ValueError(f"{path} has no 'version'; this code reads version {VERSION}, {regenerate}")
    if data["version"] != VERSION:
        raise ValueError(f"{path} has version {data['version']!r}; this code reads version {VERSION}, {regenerate}")
    meta, records = data.get("meta", {}), data.get("pairs")
    if not isinstance(meta, dict) or not isinstance(records, list):
        raise ValueError(f"{path} needs a 'meta' object and a 'pairs' list; {regenerate}")
    pairs = []
    for i, d in enumerate(records):
        where = f"pair #{i} ({d.get('id')!r}) in {path}" if isinstance(d, dict) else f"pair #{i} in {path}"
        if not isinstance(d, dict):
            raise ValueError(f"{where} is not an object; {regenerate}")
        missing = [k for k in _PAIR_FIELDS if k not in d]
        if not missing:
            change = d["change"]
            missing = [f"change.{k}" for k in _CHANGE_FIELDS if not isinstance(change, dict) or k not in change]
        if missing:
            raise ValueError(f"{where} is missing field(s) {', '.join(missing)}; {regenerate}")
        try:
            pair = Pair.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where} has a malformed field ({e}); {regenerate}") from None
        if pair.clean_answer == pair.corrupted_answer:
            raise ValueError(f"{where} has equal clean and corrupted answers ({_show(pair.clean_answer)}); a pair must change the answer: remove it from the file or regenerate the pairs")
        pairs.append(pair)
    return pairs, meta
