"""The 3-step word problems of Cywinski, Bussmann et al. (github cywinski/codi).

X, Y, Z in 1..8 with X > Y; step1 = X + Y (addition templates) or X - Y (subtraction
templates), step2 = step1 * Z, answer = step1 + step2. The question wording is theirs: the 10
addition and 10 subtraction templates of `src/templates.py` in github cywinski/codi (commit
f0bf2fa), copied verbatim; like their `prepare_prompts_json.py`, every (X, Y, Z) has X > Y.
Their paper reads step1 and step2 with the logit lens in the 3rd and 5th of 6 latents of
CODI-LLaMA-1B. The embedded default model was trained on `interp.data.arithmetic` only (its
word-level vocabulary maps every word here to `<unk>`): this task is for real checkpoints.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from interp.data.pairs import NumberChange, Pair

_TAIL = " Give the answer only and nothing else."
ADDITION_TEMPLATES = tuple(
    s + _TAIL
    for s in (
        "A team starts with {X} members. They recruit {Y} new members. Then each current member recruits {Z} additional people. How many people are there now on the team?",
        "A company starts with {X} employees. They hire {Y} more employees. Then each current employee brings in {Z} additional people. How many people are there now in the company?",
        "A school starts with {X} students. They enroll {Y} new students. Then each current student brings {Z} additional students. How many students are there now in the school?",
        "A club starts with {X} members. They add {Y} new members. Then each current member invites {Z} additional people. How many people are there now in the club?",
        "A restaurant starts with {X} customers. They welcome {Y} more customers. Then each current customer brings {Z} additional customers. How many customers are there now in the restaurant?",
        "A gym starts with {X} members. They sign up {Y} new members. Then each current member refers {Z} additional people. How many people are there now in the gym?",
        "A band starts with {X} musicians. They add {Y} more musicians. Then each current musician brings {Z} additional musicians. How many musicians are there now in the band?",
        "A community starts with {X} residents. They welcome {Y} new residents. Then each current resident invites {Z} additional people. How many people are there now in the community?",
        "A group starts with {X} participants. They add {Y} new participants. Then each current participant brings {Z} additional people. How many people are there now in the group?",
        "A workshop starts with {X} attendees. They register {Y} more attendees. Then each current attendee brings {Z} additional people. How many people are there now in the workshop?",
    )
)
SUBTRACTION_TEMPLATES = tuple(
    s + _TAIL
    for s in (
        "A team starts with {X} members. {Y} members leave the team. Then each remaining member recruits {Z} additional people. How many people are there now on the team?",
        "A company starts with {X} employees. {Y} employees resign. Then each remaining employee brings in {Z} additional people. How many people are there now in the company?",
        "A school starts with {X} students. {Y} students transfer out. Then each remaining student brings {Z} additional students. How many students are there now in the school?",
        "A club starts with {X} members. {Y} members quit. Then each remaining member invites {Z} additional people. How many people are there now in the club?",
        "A restaurant starts with {X} customers. {Y} customers leave. Then each remaining customer brings {Z} additional customers. How many customers are there now in the restaurant?",
        "A gym starts with {X} members. {Y} members cancel. Then each remaining member refers {Z} additional people. How many people are there now in the gym?",
        "A band starts with {X} musicians. {Y} musicians depart. Then each remaining musician brings {Z} additional musicians. How many musicians are there now in the band?",
        "A community starts with {X} residents. {Y} residents move away. Then each remaining resident invites {Z} additional people. How many people are there now in the community?",
        "A group starts with {X} participants. {Y} participants drop out. Then each remaining participant brings {Z} additional people. How many people are there now in the group?",
        "A workshop starts with {X} attendees. {Y} attendees withdraw. Then each remaining attendee brings {Z} additional people. How many people are there now in the workshop?",
    )
)
TEMPLATES = {"addition": ADDITION_TEMPLATES, "subtraction": SUBTRACTION_TEMPLATES}
SLOTS = ("X", "Y", "Z")
VALUES = range(1, 9)


@dataclass(frozen=True)
class ThreeStepProblem:
    """One problem: `operation` ("addition" | "subtraction"), template index, X > Y, Z."""

    operation: str
    template: int
    x: int
    y: int
    z: int

    @property
    def numbers(self) -> tuple[int, int, int]:
        return (self.x, self.y, self.z)

    @property
    def values(self) -> list[int]:
        """[step1, step2, answer]."""
        step1 = self.x + self.y if self.operation == "addition" else self.x - self.y
        step2 = step1 * self.z
        return [step1, step2, step1 + step2]

    @property
    def answer(self) -> int:
        return self.values[-1]

    def render(self) -> tuple[str, list[tuple[int, int]]]:
        """The question and the character span of X, Y and Z in it (in that order)."""
        template = TEMPLATES[self.operation][self.template]
        text, spans, last = "", {}, 0
        for m in re.finditer(r"\{([XYZ])\}", template):
            text += template[last : m.start()]
            value = str(self.numbers[SLOTS.index(m.group(1))])
            spans[m.group(1)] = (len(text), len(text) + len(value))
            text += value
            last = m.end()
        return text + template[last:], [spans[s] for s in SLOTS]

    @property
    def question(self) -> str:
        return self.render()[0]


def sample_problem(rng: random.Random) -> ThreeStepProblem:
    x, y = sorted(rng.sample(list(VALUES), 2), reverse=True)
    operation = rng.choice(sorted(TEMPLATES))
    return ThreeStepProblem(operation, rng.randrange(len(TEMPLATES[operation])), x, y, rng.choice(list(VALUES)))


def corrupt(problem: ThreeStepProblem, rng: random.Random) -> tuple[ThreeStepProblem, int]:
    """Change X, Y or Z (slot 0, 1, 2) to another value in 1..8, keeping X > Y and changing the answer."""
    candidates = []
    for slot in range(3):
        for v in VALUES:
            numbers = list(problem.numbers)
            if v == numbers[slot]:
                continue
            numbers[slot] = v
            new = ThreeStepProblem(problem.operation, problem.template, *numbers)
            if new.x > new.y and new.answer != problem.answer:
                candidates.append((new, slot))
    return rng.choice(candidates)


def three_step_pairs(n: int, seed: int = 0) -> list[Pair]:
    """`n` clean/corrupted pairs that change one of X, Y, Z (`changed_slot` 0, 1, 2) and the answer."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        clean = sample_problem(rng)
        corrupted, slot = corrupt(clean, rng)
        question, spans = clean.render()
        start, end = spans[slot]
        pairs.append(
            Pair(
                id=f"three-step-{seed}-{i}",
                clean_question=question,
                corrupted_question=corrupted.question,
                clean_answer=float(clean.answer),
                corrupted_answer=float(corrupted.answer),
                change=NumberChange(old=question[start:end], new=str(corrupted.numbers[slot]), span=(start, end)),
                source={"task": "three-step", "operation": clean.operation, "template": clean.template, "clean_xyz": list(clean.numbers), "corrupted_xyz": list(corrupted.numbers)},
                clean_intermediates=tuple(float(v) for v in clean.values),
                corrupted_intermediates=tuple(float(v) for v in corrupted.values),
                changed_slot=slot,
            )
        )
    return pairs
