"""The README's "Using it" example runs as written, and says what the default model answers."""

from __future__ import annotations

import re

from tests.conftest import REPO


def using_it_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Using it") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no python block under '## Using it' in README.md"
    return match.group(1)


def test_the_using_it_example_runs_and_its_answer_comment_holds():
    code = using_it_block()
    claimed = re.search(r'model\.generate\("([^"]+)"\).*\.answer: ([0-9.]+)', code)
    assert claimed, "the example's generate line no longer states its answer"
    scope: dict = {}
    exec(compile(code, "README.md (Using it)", "exec"), scope)  # the README's own example
    question, answer = claimed.group(1), float(claimed.group(2))
    # the stated answer is the model's, and it is the task's true answer (x0 then ops, left to right, mod 10)
    assert scope["gen"].answer == answer
    x, *ops = question.split()
    value = int(x)
    for op in ops:
        value = {"+": value + int(op[1:]), "-": value - int(op[1:]), "*": value * int(op[1:])}[op[0]] % 10
    assert value == answer
    assert scope["cache"] is not None and len(scope["r"].latents) == scope["model"].num_latents
