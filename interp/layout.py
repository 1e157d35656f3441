"""`SequenceLayout`: the one place that knows where each part of a CODI sequence sits.

A CODI sequence, in absolute positions (one question, no padding):

    [question q[0..]] [question suffix] [bot] [latent[0] .. latent[K-1]] [eot] [eot suffix]
    [answer prefix prefix[0..]] [answer answer[0..]]

The question suffix and eot suffix are empty for checkpoints trained with `remove_eos=True` (the
released scripts) and `[eos]` each with the official code's default `remove_eos=False`. The answer
prefix is "The answer is:" as tokenized; `answer[i]` are teacher-forced answer tokens (a trace
carries the common prefix of two answers, possibly empty).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

#: the one default bound of every greedy decode after the layout's last position (generate, trace, the
#: engine's patched runs): an answer such as `The answer is: 18` + eos is far shorter; the official CODI
#: code allows 256, Coconut's 64 (GSM) or 128 (ProsQA): pass `max_new_tokens` for those
MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class SequenceLayout:
    """Counts of each part of a sequence; every position is derived from them."""

    n_question: int
    num_latents: int
    n_prefix: int
    n_answer: int = 0
    n_question_suffix: int = 0
    n_eot_suffix: int = 0

    @property
    def bot(self) -> int:
        return self.n_question + self.n_question_suffix

    @property
    def n_prompt(self) -> int:
        """Positions before the first latent: question, its suffix, bot."""
        return self.bot + 1

    def latent(self, t: int) -> int:
        """Absolute position of latent t (0-based)."""
        if not 0 <= t < self.num_latents:
            raise IndexError(f"latent index {t} out of range: latents are 0..{self.num_latents - 1}")
        return self.n_prompt + t

    @property
    def latent_positions(self) -> list[int]:
        return list(range(self.n_prompt, self.n_prompt + self.num_latents))

    @property
    def eot(self) -> int:
        return self.n_prompt + self.num_latents

    @property
    def decode_start(self) -> int:
        """The last position fed before greedy decoding begins (eot, or the eot suffix's last token)."""
        return self.eot + self.n_eot_suffix

    @property
    def answer_position(self) -> int:
        """The last prefix token: its next-token logits predict the answer's first token."""
        return self.decode_start + self.n_prefix

    @property
    def seq_len(self) -> int:
        return self.answer_position + 1 + self.n_answer

    @cached_property
    def names(self) -> list[str]:
        """A name per position: q[i], q_suffix[i], bot, latent[t], eot, eot_suffix[i], prefix[i], answer[i]."""
        names = [f"q[{i}]" for i in range(self.n_question)] + [f"q_suffix[{i}]" for i in range(self.n_question_suffix)]
        names += ["bot"] + [f"latent[{t}]" for t in range(self.num_latents)] + ["eot"]
        names += [f"eot_suffix[{i}]" for i in range(self.n_eot_suffix)] + [f"prefix[{i}]" for i in range(self.n_prefix)]
        return names + [f"answer[{i}]" for i in range(self.n_answer)]

    def position(self, name: str) -> int:
        """Absolute position of a named position; `answer` is `answer_position` (the last prefix token)."""
        if name == "answer":
            return self.answer_position
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no position named {name!r}; names are {self.names}") from None

    def name(self, position: int) -> str:
        return self.names[position]
