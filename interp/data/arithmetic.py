"""A synthetic multi-step arithmetic task whose every intermediate value is known.

A problem starts from a digit x0 and applies `steps` dependent operations modulo 10:
`+c` or `-c` with c in 1..9, or `*c` with c in {3, 7, 9} (units of Z/10, so every answer stays
uniform over 0..9 and chance is 10%). The question is written `7 +5 *3 -2 *7 +4 -1`; its chain of
thought is the intermediate values `2 6 4 8 2 1`, and the answer is the last of them.
A model that answers directly must compose all the operations in one forward pass; a model with
latent thoughts can hold one intermediate value per latent. This is the task the embedded default
model is trained on (see docs/embedded_model.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from interp.data.pairs import NumberChange, Pair

OPERATORS = ("+", "-", "*")
MULTIPLIERS = (3, 7, 9)  # the units of Z/10 other than 1
ADDENDS = tuple(range(1, 10))


@dataclass(frozen=True)
class ArithmeticProblem:
    """`x0` then `ops`, a tuple of (operator, operand) applied left to right modulo 10."""

    x0: int
    ops: tuple[tuple[str, int], ...]

    @property
    def question(self) -> str:
        return " ".join([str(self.x0)] + [f"{op}{c}" for op, c in self.ops])

    @property
    def values(self) -> list[int]:
        """The intermediate values v_1..v_n after each operation; v_n is the answer."""
        out, x = [], self.x0
        for op, c in self.ops:
            x = apply_op(x, op, c)
            out.append(x)
        return out

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def chain_of_thought(self) -> str:
        """The written reasoning a teacher model is trained on: the intermediate values."""
        return " ".join(str(v) for v in self.values)


def apply_op(x: int, op: str, c: int) -> int:
    if op == "+":
        return (x + c) % 10
    if op == "-":
        return (x - c) % 10
    if op == "*":
        return (x * c) % 10
    raise ValueError(f"unknown operator {op!r}; expected one of {OPERATORS}")


def _operand_choices(op: str) -> tuple[int, ...]:
    return MULTIPLIERS if op == "*" else ADDENDS


def sample_problem(rng: random.Random, steps: int) -> ArithmeticProblem:
    ops = []
    for _ in range(steps):
        op = rng.choice(OPERATORS)
        ops.append((op, rng.choice(_operand_choices(op))))
    return ArithmeticProblem(rng.randrange(10), tuple(ops))


def _steps_range(steps: int | tuple[int, int]) -> tuple[int, int]:
    lo, hi = (steps, steps) if isinstance(steps, int) else steps
    if not 1 <= lo <= hi:
        raise ValueError(f"steps must be a positive int or a (lo, hi) range with lo <= hi, got {steps!r}")
    return lo, hi


def sample_problems(n: int, steps: int | tuple[int, int] = 6, seed: int = 0) -> list[ArithmeticProblem]:
    """`n` problems, each with a step count drawn uniformly from `steps` (an int or inclusive range)."""
    lo, hi = _steps_range(steps)
    rng = random.Random(seed)
    return [sample_problem(rng, rng.randint(lo, hi)) for _ in range(n)]


def _number_spans(problem: ArithmeticProblem) -> list[tuple[int, int]]:
    """Character span of every number in `problem.question`: x0 first, then each operand."""
    spans, pos = [(0, len(str(problem.x0)))], len(str(problem.x0))
    for _op, c in problem.ops:
        pos += 2  # the space and the operator
        spans.append((pos, pos + len(str(c))))
        pos += len(str(c))
    return spans


def corrupt(problem: ArithmeticProblem, rng: random.Random) -> tuple[ArithmeticProblem, int] | None:
    """Change one number (x0 or one operand) so that the answer changes.

    Returns the corrupted problem and the index of the changed number (0 = x0, i = operand i),
    or None when no single change alters the answer (never happens for this task's operators,
    which are all bijections of Z/10, but kept as a guard).
    """
    slots = list(range(len(problem.ops) + 1))
    rng.shuffle(slots)
    for slot in slots:
        if slot == 0:
            choices = [v for v in range(10) if v != problem.x0]
        else:
            op, c = problem.ops[slot - 1]
            choices = [v for v in _operand_choices(op) if v != c]
        rng.shuffle(choices)
        for v in choices:
            if slot == 0:
                candidate = ArithmeticProblem(v, problem.ops)
            else:
                ops = list(problem.ops)
                ops[slot - 1] = (ops[slot - 1][0], v)
                candidate = ArithmeticProblem(problem.x0, tuple(ops))
            if candidate.answer != problem.answer:
                return candidate, slot
    return None


def arithmetic_pairs(n: int, steps: int | tuple[int, int] = 6, seed: int = 0) -> list[Pair]:
    """`n` clean/corrupted pairs that differ in one number and have different answers.

    The default of 6 steps is the chain length the embedded default model was trained on.
    """
    lo, hi = _steps_range(steps)
    rng = random.Random(seed)
    pairs: list[Pair] = []
    while len(pairs) < n:
        clean = sample_problem(rng, rng.randint(lo, hi))
        result = corrupt(clean, rng)
        if result is None:
            continue
        corrupted, slot = result
        span = _number_spans(clean)[slot]
        old = clean.question[span[0] : span[1]]
        new = corrupted.question[span[0] : span[0] + (span[1] - span[0])]
        pairs.append(
            Pair(
                id=f"arith-{seed}-{len(pairs)}",
                clean_question=clean.question,
                corrupted_question=corrupted.question,
                clean_answer=float(clean.answer),
                corrupted_answer=float(corrupted.answer),
                change=NumberChange(old=old, new=new, span=span),
                source={
                    "task": "arithmetic",
                    "clean_values": clean.values,
                    "corrupted_values": corrupted.values,
                    "changed_slot": slot,
                },
                clean_intermediates=tuple(float(v) for v in clean.values),
                corrupted_intermediates=tuple(float(v) for v in corrupted.values),
                changed_slot=slot,
            )
        )
    return pairs
