"""The clean/corrupted problem pair shared by every data source, and its versioned JSON file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class NumberChange:
    """The one number that differs between the clean and the corrupted question.

    `span` is the (start, end) character span of `old` in the clean question; `new` sits at
    `(start, start + len(new))` in the corrupted question.
    """

    old: str
    new: str
    span: tuple[int, int]


@dataclass(frozen=True)
class Pair:
    """Two prompts that differ in one number and have different answers."""

    id: str
    clean_question: str
    corrupted_question: str
    clean_answer: float
    corrupted_answer: float
    change: NumberChange
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["change"]["span"] = list(self.change.span)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Pair":
        change = d["change"]
        return cls(
            id=str(d["id"]),
            clean_question=d["clean_question"],
            corrupted_question=d["corrupted_question"],
            clean_answer=float(d["clean_answer"]),
            corrupted_answer=float(d["corrupted_answer"]),
            change=NumberChange(change["old"], change["new"], tuple(change["span"])),
            source=dict(d.get("source", {})),
        )
