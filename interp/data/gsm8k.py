"""GSM8K clean/corrupted pairs: change one number of the question, recompute the annotated solution.

A GSM8K solution annotates each calculation as `<<expr=result>>`, e.g.
`16 - 3 - 4 = <<16-3-4=9>>9 eggs ... 9 * 2 = $<<9*2=18>>18`, then states the answer after `####`.
To corrupt a problem we change one integer of the question (`16` -> `17`) and re-evaluate the chain
with a safe evaluator (`ast`, arithmetic only; never `eval`). Each literal of each annotation is
traced to where it came from and takes that source's new value:

* the changed number (or, for a percentage `p%`, one of the forms p/100, 1-p/100, 1+p/100,
  100-p, 100+p) -> the new value (in the same form);
* an earlier annotation's result -> that annotation's recomputed result;
* another number of the question (digits or words such as "three", "half", "dozen"), a unit
  constant suggested by the text (7 with "week", 60 with "hour", 100 with "%", ...) or one of
  `FREE_CONSTANTS` -> unchanged.

A problem is refused as a whole (its "chain" is not consistent) when it has no annotations, an
annotation is not `<<arithmetic=number>>` or does not evaluate to its result, the answer after
`####` is not the last annotation's result, the solution selects a value (a bare `<<125=125>>` or
a `<`/`>` comparison in the prose: a change could flip the choice), a literal cannot be traced, or
a literal matches a number the prose computes outside the annotations (`180-12 = 168` with no
`<<...>>`: it may depend on the changed number). A change is refused when the number is no literal
of the chain, when a literal matches sources with different new values (the changed `3` and
another `3` of the question, the changed `16` and a result 16: "ambiguous"), when the answer does
not change, or when the result is not "nice".

Kept changes are "nice": the new number has the clean one's digit count and trailing zeros
(`80,000` -> `30,000`, `150` -> `230`, `$4.00` -> `$7.00`, single digits become 2..9) and is not a
value already written in the question; every recomputed step keeps its clean counterpart's kind
(integral if it was integral, non-negative if it was non-negative, always finite). So a positive
integer answer becomes a non-negative integer; non-integral or negative corrupted answers of such
problems are dropped (`drop.not_nice`). Decimals (other than `.00`), fractions (`1/2`), times or
ratios (`7:11`), ordinals (`3rd`), numbers glued after a letter and zero are never changed (they
are counted in `numbers.skipped`).

Every stage is counted in a `collections.Counter` passed as `counts`, keys in funnel order:
`read`; `drop.no_annotations`, `drop.bad_annotation`, `drop.inconsistent_chain`,
`drop.final_mismatch`, `drop.selection_step`, `drop.untraced_literal`, `drop.unannotated_step`;
`chain_consistent`; `drop.no_changeable_number`, `drop.number_not_in_chain`, `drop.ambiguous`;
`number_traced`; `drop.answer_unchanged`, `drop.not_nice`; `corrupted` (pairs made); `sampled`
(pairs returned); and `numbers.seen` / `numbers.skipped` over all questions read. Several changes
are tried per problem; a problem that gives no pair is counted under the furthest stage reached.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interp.data.pairs import NumberChange, Pair

HUB_DATASET = ("openai/gsm8k", "main")
NEW_VALUES_PER_NUMBER = 8  # new values tried for each usable number before moving to the next

# Literals accepted as constants in an annotation even when nothing in the text explains them.
FREE_CONSTANTS = (0.0, 1.0, 2.0, 10.0, 100.0)

# Number words of the question: each stands for these values (a "third" may be 3 or 1/3).
_NUMBER_WORDS: dict[str, tuple[float, ...]] = {
    **{w: (float(i),) for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())},
    **{w: (float(10 * i),) for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), start=3)},
    "hundred": (100.0,),
    "thousand": (1000.0,),
    "million": (1e6,),
    "half": (2.0, 0.5),
    "halves": (2.0, 0.5),
    "twice": (2.0,),
    "double": (2.0,),
    "pair": (2.0,),
    "triple": (3.0,),
    "thrice": (3.0,),
    "third": (3.0, 1 / 3),
    "quadruple": (4.0,),
    "quarter": (4.0, 0.25),
    "fourth": (4.0, 0.25),
    "fifth": (5.0, 0.2),
    "tenth": (10.0, 0.1),
    "dozen": (12.0,),
}
# Unit constants a solution may use silently, keyed by a word prefix found in question or solution.
_UNIT_WORDS: dict[str, tuple[float, ...]] = {
    "week": (7.0, 52.0),
    "day": (24.0, 7.0),
    "daily": (7.0,),
    "hour": (60.0, 24.0),
    "minute": (60.0,),
    "second": (60.0,),
    "month": (12.0, 30.0, 4.0),
    "year": (12.0, 52.0, 365.0),
    "annual": (12.0, 52.0, 365.0),
    "percent": (100.0, 0.01),
    "cent": (100.0,),
    "dollar": (100.0,),
    "feet": (12.0, 3.0),
    "foot": (12.0, 3.0),
    "yard": (3.0, 36.0),
    "inch": (12.0,),
    "pound": (16.0,),
    "gallon": (4.0, 128.0),
    "quart": (4.0,),
    "mile": (5280.0,),
    "decade": (10.0,),
    "centur": (100.0,),
}

_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d+)?|\.\d+")
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_TEXT_RESULT = re.compile(rf"=\s*\$?\s*({_NUMBER.pattern})")  # "= $7200" in the prose
_ARITHMETIC_CHARS = re.compile(r"[\d.\s()+\-*/%]*")

_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_MAX_EXPONENT = 64.0


class Skipped(Exception):
    """A problem or a change that cannot give a trustworthy pair; `reason` is a count key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------- safe arithmetic


def parse_expr(text: str) -> ast.expr:
    """Parse `text` as arithmetic: numbers, + - * / // % **, parentheses, unary minus/plus.

    Raises ValueError for anything else (names, calls, strings, commas, 1e3, 0x10 ...).
    Never evaluates.
    """
    if not _ARITHMETIC_CHARS.fullmatch(text):
        raise ValueError(f"not an arithmetic expression: {text!r} (only digits, '.', + - * / % ( ) allowed)")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {text!r} ({e.msg})") from None
    for node in ast.walk(tree):
        ok = (
            (isinstance(node, ast.Constant) and type(node.value) in (int, float))
            or (isinstance(node, ast.BinOp) and type(node.op) in _BINARY)
            or (isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY)
            or isinstance(node, (ast.operator, ast.unaryop))
        )
        if not ok:
            raise ValueError(f"not an arithmetic expression: {text!r} (contains {type(node).__name__})")
    return tree


def evaluate(tree: ast.expr, literal: Callable[[ast.Constant], float] | None = None) -> float:
    """Evaluate a tree from `parse_expr` in floats; `literal(node)` may replace each number's value.

    Raises ArithmeticError (division by zero, overflow) or ValueError (complex or huge power).
    """
    if isinstance(tree, ast.Constant):
        return float(tree.value) if literal is None else literal(tree)
    if isinstance(tree, ast.UnaryOp):
        return _UNARY[type(tree.op)](evaluate(tree.operand, literal))
    assert isinstance(tree, ast.BinOp), "tree must come from parse_expr"
    left, right = evaluate(tree.left, literal), evaluate(tree.right, literal)
    if isinstance(tree.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
        raise ValueError(f"exponent {right} is too large")
    value = _BINARY[type(tree.op)](left, right)
    if isinstance(value, complex):
        raise ValueError(f"{left} ** {right} is not real")
    return value


def literals(tree: ast.expr) -> list[ast.Constant]:
    """The number nodes of `tree` in source order."""
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    return sorted(nodes, key=lambda n: (n.lineno, n.col_offset))


def _format_literal(value: float) -> str:
    """`18` for integral values, else the shortest round-tripping float; negatives in parentheses."""
    text = str(int(value)) if float(value).is_integer() else repr(float(value))
    return f"({text})" if value < 0 else text


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def _integral(x: float) -> bool:
    return math.isfinite(x) and _close(x, round(x))


# ---------------------------------------------------------------- problem structure


@dataclass(frozen=True)
class QuestionNumber:
    """A number written in digits in the question. `text` is as written ("80,000"), `span` its
    characters; `changeable` says whether it is a plain positive integer we know how to rewrite."""

    text: str
    value: float
    span: tuple[int, int]
    percent: bool
    changeable: bool

    def forms(self, value: float) -> list[float]:
        """The values under which the number may appear in a solution, given it is `value`."""
        if not self.percent:
            return [value]
        return [value, value / 100, 1 - value / 100, 1 + value / 100, 100 - value, 100 + value]


def question_numbers(question: str) -> list[QuestionNumber]:
    """Every digit-written number of `question`, in order (indexes for `corrupt_problem`)."""
    out = []
    for m in _NUMBER.finditer(question):
        text, (start, end) = m.group(), m.span()
        before, after = question[max(0, start - 2) : start], question[end : end + 3]
        changeable = (
            re.fullmatch(r"[\d,]+(?:\.0+)?", text) is not None  # "$4.00" is an integer in money format
            and not text.startswith("0")
            and not (before[-1:].isalpha() or re.search(r"\d[/:]$", before))  # A1, 1/2, 7:11
            and not re.match(r"[/:]\d|(?:st|nd|rd|th)\b", after)
        )
        percent = re.match(r"\s?(?:%|percent)", question[end:]) is not None
        out.append(QuestionNumber(text, float(text.replace(",", "")), (start, end), percent, changeable))
    return out


@dataclass(frozen=True)
class Step:
    """One annotation `<<expr=result>>` of a solution."""

    expr: str
    tree: ast.expr
    result: float


@dataclass(frozen=True)
class Corruption:
    """A changed question and its recomputed solution. `chain` holds, per annotation, the clean
    `expr`/`result` and the `corrupted_expr` (literals replaced by their new values) and its
    `corrupted_result`. The answers are the last annotation's results."""

    question: str
    corrupted_question: str
    number_index: int
    change: NumberChange
    clean_answer: float
    corrupted_answer: float
    chain: tuple[dict[str, Any], ...]


class Problem:
    """A GSM8K row whose annotation chain is consistent and fully traceable (else `Skipped`).

    Parsing once and calling `corrupt` for several changes is what `gsm8k_pairs` does.
    """

    def __init__(self, question: str, answer_text: str):
        self.question, self.answer_text = question, answer_text
        self.numbers = question_numbers(question)
        self.steps = _parse_steps(answer_text)
        _check_final(answer_text, self.steps[-1].result)
        _check_no_selection(answer_text, self.steps)
        self._fixed = self._fixed_values()
        self._check_traceable(answer_text)

    def _fixed_values(self) -> list[float]:
        """Values that never change: fractions a/b of the question, number words, unit constants."""
        q, text = self.question, self.question + "\n" + self.answer_text
        fixed = [a.value / b.value for a, b in zip(self.numbers, self.numbers[1:]) if q[a.span[1] : b.span[0]] == "/" and b.value]
        fixed += [v for w, vs in _NUMBER_WORDS.items() if re.search(rf"\b{w}s?\b", q, re.I) for v in vs]
        fixed += [v for w, vs in _UNIT_WORDS.items() if re.search(rf"\b{w}", text, re.I) for v in vs]
        if "%" in text:
            fixed += [100.0, 0.01]
        return fixed

    def _check_traceable(self, answer_text: str) -> None:
        """Refuse literals that nothing explains, or that the prose computes outside annotations."""
        prose = _ANNOTATION.sub("\x00", answer_text)  # "= <<16-3-4=9>>9" is not a prose result
        prose_results = [float(m.group(1).replace(",", "")) for m in _TEXT_RESULT.finditer(prose)]
        unannotated = [v for v in prose_results if not any(_close(v, s.result) for s in self.steps)]
        known = [f for n in self.numbers for f in n.forms(n.value)] + self._fixed + list(FREE_CONSTANTS)
        for k, step in enumerate(self.steps):
            for node in literals(step.tree):
                v = float(node.value)
                if any(_close(v, u) for u in unannotated):
                    raise Skipped("unannotated_step", f"{v:g} in <<{step.expr}>> is computed in the prose")
                explained = known + [s.result for s in self.steps[:k]]
                if not any(_close(v, u) for u in explained):
                    raise Skipped("untraced_literal", f"{v:g} in <<{step.expr}>>")

    def corrupt(self, number_index: int, new_value: int) -> Corruption:
        """Replace question number `number_index` by `new_value` and recompute the chain.

        Raises Skipped with reason `number_not_in_chain`, `ambiguous`, `answer_unchanged` or
        `not_nice` (see the module docstring); ValueError if the number cannot be changed at all.
        """
        if not 0 <= number_index < len(self.numbers):
            raise ValueError(f"number_index {number_index} out of range: the question has {len(self.numbers)} numbers")
        number = self.numbers[number_index]
        if not number.changeable:
            raise ValueError(f"question number {number.text!r} is not a plain integer that can be changed")
        if new_value == number.value or new_value < 0:
            raise ValueError(f"new_value must be a non-negative integer other than {number.text}, got {new_value}")
        new_forms = number.forms(float(new_value))
        others = [f for n in self.numbers if n is not number for f in n.forms(n.value)] + self._fixed

        new_results: list[float] = []
        used = False

        def resolve(node: ast.Constant) -> float:
            nonlocal used
            v = float(node.value)
            candidates = [new for old, new in zip(number.forms(number.value), new_forms) if _close(v, old)]
            used |= bool(candidates)
            candidates += [u for u in others if _close(v, u)]
            candidates += [new for s, new in zip(self.steps, new_results) if _close(v, s.result)]
            if any(not _close(c, candidates[0]) for c in candidates):
                raise Skipped("ambiguous", f"{v:g} could be any of {sorted(set(candidates))}")
            return candidates[0] if candidates else v

        chain = []
        for step in self.steps:
            new_subst: dict[tuple[int, int], float] = {}

            def literal(node: ast.Constant) -> float:
                new_subst[(node.col_offset, node.end_col_offset)] = value = resolve(node)  # noqa: B023 - called within this iteration
                return value

            try:
                result = evaluate(step.tree, literal)
            except (ArithmeticError, ValueError) as e:
                raise Skipped("not_nice", f"<<{step.expr}>> fails: {e}") from None
            result = _check_nice(step.result, result, step.expr)
            new_results.append(result)
            chain.append({"expr": step.expr, "result": step.result, "corrupted_expr": _substitute(step.expr, new_subst), "corrupted_result": result})
        if not used:
            raise Skipped("number_not_in_chain", f"{number.text} is not a literal of any annotation")
        clean_answer, corrupted_answer = self.steps[-1].result, new_results[-1]
        if _close(clean_answer, corrupted_answer):
            raise Skipped("answer_unchanged", f"the answer stays {clean_answer:g}")

        new_text = f"{new_value:,}" if "," in number.text else str(new_value)
        new_text += number.text[len(number.text.partition(".")[0]) :]  # keep a ".00" money suffix
        start, end = number.span
        return Corruption(
            question=self.question,
            corrupted_question=self.question[:start] + new_text + self.question[end:],
            number_index=number_index,
            change=NumberChange(old=number.text, new=new_text, span=number.span),
            clean_answer=clean_answer,
            corrupted_answer=corrupted_answer,
            chain=tuple(chain),
        )


def _parse_steps(answer_text: str) -> list[Step]:
    bodies = _ANNOTATION.findall(answer_text)
    if not bodies:
        raise Skipped("no_annotations")
    steps = []
    for body in bodies:
        expr, eq, stated = body.partition("=")
        if not eq or not _PLAIN_NUMBER.fullmatch(stated.strip()):
            raise Skipped("bad_annotation", f"<<{body}>> is not <<expr=number>>")
        try:
            tree = parse_expr(expr)
            value = evaluate(tree)
        except (ArithmeticError, ValueError) as e:
            raise Skipped("bad_annotation", f"<<{body}>>: {e}") from None
        result = float(stated)
        if not _close(value, result):
            raise Skipped("inconsistent_chain", f"<<{body}>> evaluates to {value:g}")
        steps.append(Step(expr.strip(), tree, result))
    return steps


def _check_final(answer_text: str, last_result: float) -> None:
    """The answer stated after `####` must be the last annotation's result."""
    _, sep, final_text = answer_text.rpartition("####")
    final_text = final_text.strip().replace(",", "").lstrip("$")
    if not sep or not _PLAIN_NUMBER.fullmatch(final_text):
        raise Skipped("final_mismatch", f"no numeric answer after '####': {final_text!r}")
    if not _close(float(final_text), last_result):
        raise Skipped("final_mismatch", f"the answer {final_text} is not the last annotation's result {last_result:g}")


def _check_no_selection(answer_text: str, steps: list[Step]) -> None:
    """Refuse solutions that choose between values (`since 125 > 96 ... <<125=125>>`): the chain
    records the choice, not the comparison, so a change could flip it unnoticed."""
    bare = [s.expr for s in steps if isinstance(s.tree, ast.Constant)]
    if bare:
        raise Skipped("selection_step", f"<<{bare[0]}=...>> copies a value")
    if re.search(r"[<>]", _ANNOTATION.sub("", answer_text)):
        raise Skipped("selection_step", "the prose compares values with < or >")


def _check_nice(clean: float, new: float, expr: str) -> float:
    """`new` (snapped to an integer when `clean` is one), or Skipped if it breaks `clean`'s kind."""
    if not math.isfinite(new):
        raise Skipped("not_nice", f"<<{expr}>> becomes {new}")
    if _integral(clean):
        if not _integral(new):
            raise Skipped("not_nice", f"<<{expr}>> becomes non-integral {new:g}")
        new = float(round(new))
    if clean >= 0 > new:
        raise Skipped("not_nice", f"<<{expr}>> becomes negative {new:g}")
    return new


def _substitute(expr: str, values: dict[tuple[int, int], float]) -> str:
    """`expr` with the literal at each (start, end) column span replaced by its new value."""
    out, pos = [], 0
    for (start, end), value in sorted(values.items()):
        old = expr[start:end]
        out += [expr[pos:start], old if _close(float(old), value) else _format_literal(value)]
        pos = end
    return "".join(out) + expr[pos:]


def new_values(old: int) -> list[int]:
    """Candidate replacements for `old`: same digit count and trailing zeros (1-digit: 2..9)."""
    digits = len(str(old))
    if digits == 1:
        return [v for v in range(2, 10) if v != old]
    zeros = len(str(old)) - len(str(old).rstrip("0"))
    scale, head = 10**zeros, old // 10**zeros
    lo = 10 ** (digits - zeros - 1)
    return [k * scale for k in range(lo, 10 * lo) if k != head]


def corrupt_problem(question: str, answer_text: str, number_index: int, new_value: int) -> Corruption:
    """Change question number `number_index` (see `question_numbers`) to `new_value`.

    Raises Skipped (with a `reason` from the module docstring) when the pair would not be
    trustworthy, ValueError when the requested change is impossible.
    """
    return Problem(question, answer_text).corrupt(number_index, new_value)


# ---------------------------------------------------------------- the dataset


_FUNNEL = (
    "read",
    "drop.no_annotations",
    "drop.bad_annotation",
    "drop.inconsistent_chain",
    "drop.final_mismatch",
    "drop.selection_step",
    "drop.untraced_literal",
    "drop.unannotated_step",
    "chain_consistent",
    "drop.no_changeable_number",
    "drop.number_not_in_chain",
    "drop.ambiguous",
    "number_traced",
    "drop.answer_unchanged",
    "drop.not_nice",
    "corrupted",
    "sampled",
    "numbers.seen",
    "numbers.skipped",
)
# How far a failed change got; a problem is counted under its furthest attempt.
_CHANGE_STAGES = ("no_changeable_number", "number_not_in_chain", "ambiguous", "answer_unchanged", "not_nice")


def read_gsm8k(path: str | Path | None = None, split: str = "test") -> list[dict[str, str]]:
    """GSM8K rows {"question", "answer"} from a JSONL file, a directory holding `<split>.jsonl`,
    or (path None) the hub copy `openai/gsm8k` "main" through the `datasets` package."""
    if path is None:
        return _read_hub(split)
    path = Path(path)
    file = path / f"{split}.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no GSM8K file at {file}; pass a .jsonl file or a directory holding {split}.jsonl")
    rows = []
    with file.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({"question": str(row["question"]), "answer": str(row["answer"])})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{file}:{line_no} is not a GSM8K row with 'question' and 'answer' ({e})") from None
    return rows


def _read_hub(split: str) -> list[dict[str, str]]:
    name, config = HUB_DATASET
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
        return [{"question": r["question"], "answer": r["answer"]} for r in ds]
    except Exception as e:  # import errors, no network, no such split: all mean "use a local copy"
        raise RuntimeError(
            f"could not load {name} ({config}, split {split!r}) from the Hugging Face hub: {type(e).__name__}: {e}. Pass path= to a local copy (a directory holding {split}.jsonl)."
        ) from e


def _pair_for_row(index: int, row: dict[str, str], split: str, seed: int, counts: Counter) -> Pair | None:
    """Try changes in a seeded order until one gives a pair; count the row under its outcome."""
    try:
        problem = Problem(row["question"], row["answer"])
    except Skipped as e:
        counts[f"drop.{e.reason}"] += 1
        return None
    counts["chain_consistent"] += 1
    rng = random.Random(f"gsm8k:{split}:{seed}:{index}")
    order = [i for i, n in enumerate(problem.numbers) if n.changeable]
    rng.shuffle(order)
    taken = {n.value for n in problem.numbers}
    furthest = 0
    for i in order:
        choices = [v for v in new_values(int(problem.numbers[i].value)) if v not in taken]
        for new in rng.sample(choices, min(NEW_VALUES_PER_NUMBER, len(choices))):
            try:
                c = problem.corrupt(i, new)
            except Skipped as e:
                furthest = max(furthest, _CHANGE_STAGES.index(e.reason))
                if e.reason in ("number_not_in_chain", "ambiguous"):
                    break  # these do not depend on the new value
                continue
            counts["number_traced"] += 1
            counts["corrupted"] += 1
            return Pair(
                id=f"gsm8k-{split}-{index}",
                clean_question=c.question,
                corrupted_question=c.corrupted_question,
                clean_answer=c.clean_answer,
                corrupted_answer=c.corrupted_answer,
                change=c.change,
                source={"dataset": "gsm8k", "split": split, "index": index, "question": row["question"], "answer": row["answer"], "number_index": c.number_index, "chain": [dict(s) for s in c.chain]},
                clean_intermediates=tuple(float(s["result"]) for s in c.chain),
                corrupted_intermediates=tuple(float(s["corrupted_result"]) for s in c.chain),
                changed_slot=c.number_index,
            )
    if furthest >= _CHANGE_STAGES.index("answer_unchanged"):
        counts["number_traced"] += 1
    counts[f"drop.{_CHANGE_STAGES[furthest]}"] += 1
    return None


def gsm8k_pairs(
    path: str | Path | None = None,
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    counts: Counter | None = None,
) -> list[Pair]:
    """Clean/corrupted GSM8K pairs (one number changed, answer recomputed and changed).

    `path`: a GSM8K JSONL file or a directory holding `<split>.jsonl`; None loads the hub copy.
    `n`: return at most `n` pairs, a seeded random subset kept in dataset order (None: all).
    `seed`: fixes which number changes and to what; a row's pair depends only on the row,
    `split`, `seed` and the row's index in the file (not on the other rows).
    `counts`: a Counter to fill with the stage counts described in the module docstring.
    Pair ids are `gsm8k-<split>-<row index>`; `source` holds the row and the recomputed chain.
    """
    if n is not None and n < 0:
        raise ValueError(f"n must be None or a non-negative number of pairs, got {n}")
    counts = Counter() if counts is None else counts
    counts.update(dict.fromkeys(_FUNNEL, 0))  # fixes the printing order
    rows = read_gsm8k(path, split)
    pairs = []
    for index, row in enumerate(rows):
        counts["read"] += 1
        numbers = question_numbers(row["question"])
        counts["numbers.seen"] += len(numbers)
        counts["numbers.skipped"] += sum(not x.changeable for x in numbers)
        pair = _pair_for_row(index, row, split, seed, counts)
        if pair is not None:
            pairs.append(pair)
    if n is not None and n < len(pairs):
        keep = set(random.Random(seed).sample(range(len(pairs)), n))
        pairs = [p for i, p in enumerate(pairs) if i in keep]
    counts["sampled"] += len(pairs)
    return pairs
