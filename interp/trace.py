"""Tracing a pair: both sides run through the real latent loop, aligned, scored at one token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from interp.data.pairs import Pair
from interp.engine import check_aligned
from interp.metrics import first_difference, logit_diff
from interp.model import LatentModel, Trace


@dataclass
class PairTraces:
    """A pair's clean and corrupted traces, aligned, scored at the answers' first differing token."""

    pair: Pair
    clean: Trace
    corrupted: Trace
    clean_token: int
    corrupted_token: int

    @property
    def clean_logit_diff(self) -> float:
        return logit_diff(self.clean.next_logits, self.clean_token, self.corrupted_token)

    @property
    def corrupted_logit_diff(self) -> float:
        return logit_diff(self.corrupted.next_logits, self.clean_token, self.corrupted_token)


def trace_pair(model: LatentModel, pair: Pair, *, names_filter: Callable[[str], bool] | Sequence[str] | str | None = None) -> PairTraces:
    """Trace both sides with the answers' common prefix teacher-forced after `The answer is:`.

    `names_filter` keeps only those hooks in the traces' caches (as `run_with_cache` takes it).
    """
    clean_ids = model.answer_token_ids(pair.clean_answer)
    corrupted_ids = model.answer_token_ids(pair.corrupted_answer)
    i = first_difference(clean_ids.tolist(), corrupted_ids.tolist())
    common = clean_ids[:i]
    clean = model.trace(pair.clean_question, answer=common, names_filter=names_filter)
    corrupted = model.trace(pair.corrupted_question, answer=common, names_filter=names_filter)
    check_aligned(corrupted, clean)
    return PairTraces(pair, clean, corrupted, int(clean_ids[i]), int(corrupted_ids[i]))


def similarity_positions(trace: Trace) -> tuple[list[int], list[str]]:
    """Positions whose activations the similarity metrics compare: the latents, eot, the answer."""
    positions = trace.latent_positions + [trace.position("eot"), trace.answer_position]
    return positions, [trace.position_names[p] if p != trace.answer_position else "answer" for p in positions]
