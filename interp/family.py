"""The two families of continuous-thought models, and the one place where they differ.

Both run the same loop (`interp.model.LatentModel`): a prompt ending in a begin-of-thoughts marker,
K thoughts fed as input embeddings, each made from the final-normed last-layer state at the
position before it (HF's `hidden_states[-1]`), an end-of-thoughts marker, then the written answer.
What differs is the *thought map* (state -> next input embedding) and the text format:

| | CODI (Shen et al. 2025) | Coconut (Hao et al. 2024) |
|---|---|---|
| thought map | `prj`: Linear-GELU-Linear[-LayerNorm] | the identity: the state itself |
| prompt | `tokenizer(question)` [+ eos] + `bot` | `tokenizer(question + "\\n")` + `<|start-latent|>` |
| after the thoughts | `eot` [+ eos] | `<|end-latent|>` |
| answer written after | `The answer is:` | `###` (the official text is `"### " + answer`) |
| greedy decoding | over ids < eot (the official code drops the last row) | over the whole vocabulary |
| answer rule | the last number in the text, commas removed | the text after the last `#`, stripped, commas removed; a number where it parses |

The thought map is a hook point of the `HookedTransformer` for both: `hook_thought` is the vector
fed as the next thought (CODI: `prj`'s output; Coconut: the final-normed state); CODI adds
`prj.hook_in` (the final-normed state `prj` reads) and `prj.hook_hidden` (after its GELU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")

Answer = float | str | None


def last_number(text: str) -> float | None:
    """The official CODI rule: the last number in the text, commas removed; None if there is none."""
    numbers = NUMBER_RE.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def after_last_hash(text: str) -> float | str | None:
    """The official Coconut rule (`text.split("#")[-1].replace(",", "").strip()`): a number where
    the whole of it parses as one, else the text itself (ProsQA answers are sentences); None if empty."""
    answer = text.split("#")[-1].replace(",", "").strip()
    if not answer:
        return None
    try:
        return float(answer)
    except ValueError:
        return answer


@dataclass(frozen=True)
class Family:
    """The text format of a family (its thought map is the model's `prj`, None for the identity).

    question_template: how the question is written before tokenizing (`{question}` is replaced; the
        question comes first, so alignment appends `question_text("")` to each question).
    answer_prefix: the text the model writes before the answer (the default of `LatentModel.answer_prefix`).
    decode_below_eot: greedy decoding considers only ids < eot (CODI) instead of the whole vocabulary.
    answer_rule: how the answer is read from the decoded text.
    """

    name: Literal["codi", "coconut"]
    question_template: str
    answer_prefix: str
    decode_below_eot: bool
    answer_rule: Literal["last_number", "after_last_hash"]

    def question_text(self, question: str) -> str:
        return self.question_template.replace("{question}", question)

    def extract_answer(self, text: str) -> Answer:
        return last_number(text) if self.answer_rule == "last_number" else after_last_hash(text)


CODI = Family(name="codi", question_template="{question}", answer_prefix="The answer is:", decode_below_eot=True, answer_rule="last_number")
COCONUT = Family(name="coconut", question_template="{question}\n", answer_prefix="###", decode_below_eot=False, answer_rule="after_last_hash")
FAMILIES = {f.name: f for f in (CODI, COCONUT)}


def answers_equal(a: Answer, b: Answer) -> bool:
    """Two answers are the same: numbers within float rounding, texts exactly; None equals nothing."""
    if a is None or b is None:
        return False
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return abs(float(a) - float(b)) <= max(1e-6, 1e-9 * max(abs(float(a)), abs(float(b))))
