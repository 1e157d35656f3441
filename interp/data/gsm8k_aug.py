"""GSM8K-Aug, the iCoT text format Coconut trains on (Deng et al., github da03/Internalize_CoT_Step_by_Step).

One problem per line: `question||<<16-3-4=9>> <<9*2=18>> #### 18`. The steps are the calculator
annotations `<<expr=result>>`, separated by single spaces (so none holds whitespace; a problem may
have none: `question|| #### 26`), and the answer is the text after `####`, as written (GSM8K keeps
"1,000"). Coconut's `preprocessing/gsm_icot.py` turns each line into the JSON record
`{"question", "steps", "answer"}` that `read_icot` returns, with one difference: a line without
steps gives `steps == []`, where the official split gives `[""]`.

`gsm8k_to_icot` derives these records from original GSM8K rows (`interp.data.gsm8k.read_gsm8k`):
the annotations of the solution in order, found with `interp.data.gsm8k`'s own pattern, and the
answer after its `####`. On the GSM8K test split this reproduces iCoT's test.txt line for line.
Malformed lines and records raise a one-line ValueError naming the line (or record) and the fix.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from interp.data.gsm8k import _ANNOTATION

_STEP = re.compile(r"<<[^<>\s]+>>")
_FORMAT = "expected 'question||<<a=b>> <<c=d>> #### answer'"


def _check_steps(steps: list[str]) -> list[str]:
    """`steps`, unless one is not a `<<...>>` annotation without whitespace (ValueError)."""
    bad = next((s for s in steps if not _STEP.fullmatch(s)), None)
    if bad is not None:
        raise ValueError(f"step {bad!r} is not one <<expr=result>> annotation without whitespace (steps are separated by single spaces)")
    return steps


def _parse_line(line: str) -> dict[str, Any]:
    """One iCoT line as a Coconut record {"question", "steps", "answer"} (ValueError if malformed)."""
    if line.count("||") != 1:
        raise ValueError(f"has {line.count('||')} '||' separators, expected one between question and steps; {_FORMAT}")
    question, rest = line.split("||")
    if rest.count("####") != 1:
        raise ValueError(f"has {rest.count('####')} '####' after the '||', expected one before the answer; {_FORMAT}")
    steps, answer = (part.strip() for part in rest.split("####"))
    if not question.strip() or not answer:
        raise ValueError(f"has an empty {'question' if not question.strip() else 'answer'}; {_FORMAT}")
    return {"question": question, "steps": _check_steps(steps.split(" ") if steps else []), "answer": answer}


def read_icot(path: str | Path) -> list[dict[str, Any]]:
    """Read an iCoT text file (blank lines skipped) as Coconut records {"question", "steps", "answer"}.

    Raises ValueError `<path>:<line number> ...` naming what is malformed and the expected format.
    """
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                records.append(_parse_line(line))
            except ValueError as e:
                raise ValueError(f"{path}:{line_no} {e}") from None
    return records


def _icot_line(record: Any) -> str:
    if not isinstance(record, dict) or not all(k in record for k in ("question", "steps", "answer")):
        raise ValueError("is not a record with 'question', 'steps' and 'answer'")
    question, steps, answer = record["question"], record["steps"], record["answer"]
    if not isinstance(question, str) or not question.strip() or any(c in question for c in ("||", "\n", "\r")):
        raise ValueError(f"has question {question!r}: it must be non-empty text without '||' or a line break")
    if not isinstance(answer, str) or not answer.strip() or any(c in answer for c in ("#", "\n", "\r")) or answer != answer.strip():
        raise ValueError(f"has answer {answer!r}: it must be stripped non-empty text without '#' or a line break")
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise ValueError("has 'steps' that are not a list of text")
    _check_steps(steps)
    return f"{question}||{' '.join(steps)} #### {answer}"


def write_icot(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write Coconut records as iCoT lines (`read_icot` reads them back equal); atomic: a
    temporary file next to `path` is moved into place. ValueError names the first bad record."""
    path = Path(path)
    lines = []
    for i, record in enumerate(records):
        try:
            lines.append(_icot_line(record) + "\n")
        except ValueError as e:
            raise ValueError(f"cannot write {path}: record #{i} {e}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def gsm8k_to_icot(records: Iterable[dict[str, str]]) -> list[dict[str, Any]]:
    """Original GSM8K rows {"question", "answer"} as Coconut records in the iCoT format: steps are
    the solution's `<<expr=result>>` annotations in order, the answer the text after `####`.

    Raises ValueError naming the row when its solution has no `####` answer.
    """
    out = []
    for i, row in enumerate(records):
        solution = row["answer"]
        _, sep, answer = solution.rpartition("####")
        if not sep or not answer.strip():
            raise ValueError(f"GSM8K row #{i} has no answer after '####' in its solution; pass rows read by interp.data.gsm8k.read_gsm8k")
        out.append({"question": row["question"], "steps": [f"<<{body}>>" for body in _ANNOTATION.findall(solution)], "answer": answer.strip()})
    return out
