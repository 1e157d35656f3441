"""Training and held-out problems of the arithmetic task, and their token sequences.

Held-out sets use fixed seeds that no training batch uses (training batch seeds are
>= 1,000,000), and every training problem whose question string appears in a held-out set
(dev, test, or either side of the swap pairs) is dropped.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from interp.data.arithmetic import ArithmeticProblem, arithmetic_pairs, sample_problems
from interp.train.tokenizer import BOT_ID, EOS_ID, EOT_ID, hf_tokenizer

DEV_SEED = 900_001  # 200 problems: early stopping
TEST_SEED = 900_002  # 1,000 problems: the reported numbers
PAIRS_SEED = 900_003  # 1,000 clean/corrupted pairs: latent swap
DEV_SIZE, TEST_SIZE, PAIRS_SIZE = 200, 1000, 1000
TRAIN_SEED_BASE = 1_000_000


@lru_cache(maxsize=1)
def tokenizer():
    return hf_tokenizer()


def dev_problems(steps=6, n: int = DEV_SIZE) -> list[ArithmeticProblem]:
    return sample_problems(n, steps, seed=DEV_SEED)


def test_problems(steps=6, n: int = TEST_SIZE) -> list[ArithmeticProblem]:
    return sample_problems(n, steps, seed=TEST_SEED)


def swap_pairs(steps=6, n: int = PAIRS_SIZE):
    return arithmetic_pairs(n, steps, seed=PAIRS_SEED)


@lru_cache(maxsize=8)
def heldout_questions(steps=6) -> frozenset[str]:
    qs = {p.question for p in dev_problems(steps)} | {p.question for p in test_problems(steps)}
    for pair in swap_pairs(steps):
        qs.add(pair.clean_question)
        qs.add(pair.corrupted_question)
    return frozenset(qs)


def train_batch(step: int, batch_size: int, steps=6, seed: int = 0) -> list[ArithmeticProblem]:
    """Training batch `step` of run `seed`: fresh problems, none of whose questions is held out."""
    banned = heldout_questions(steps)
    out: list[ArithmeticProblem] = []
    k = 0
    while len(out) < batch_size:
        batch_seed = TRAIN_SEED_BASE * (seed + 1) + step * 16 + k  # k < 16 in practice
        out.extend(p for p in sample_problems(batch_size, steps, seed=batch_seed) if p.question not in banned)
        k += 1
    return out[:batch_size]


def prompt_ids(question: str) -> list[int]:
    """`<s> question <bot>`."""
    return tokenizer()(question)["input_ids"] + [BOT_ID]


def answer_suffix_ids(answer: int) -> list[int]:
    """`The answer is : N </s>`."""
    return tokenizer()(f"The answer is: {answer}", add_special_tokens=False)["input_ids"] + [EOS_ID]


def chain_ids(problem: ArithmeticProblem) -> list[int]:
    return tokenizer()(problem.chain_of_thought, add_special_tokens=False)["input_ids"]


def teacher_ids(problem: ArithmeticProblem) -> list[int]:
    """`<s> question <bot> v1 .. vn <eot> The answer is : N </s>`."""
    return prompt_ids(problem.question) + chain_ids(problem) + [EOT_ID] + answer_suffix_ids(problem.answer)


def student_answer_ids(problem: ArithmeticProblem) -> list[int]:
    """What follows the latents: `<eot> The answer is : N </s>`."""
    return [EOT_ID] + answer_suffix_ids(problem.answer)


def direct_ids(problem: ArithmeticProblem) -> list[int]:
    """`<s> question The answer is : N </s>` (the direct-answer baseline)."""
    return tokenizer()(problem.question)["input_ids"] + answer_suffix_ids(problem.answer)


def stack(rows: list[list[int]]) -> torch.Tensor:
    lens = {len(r) for r in rows}
    if len(lens) != 1:
        raise ValueError(f"this trainer batches equal-length sequences only, got lengths {sorted(lens)}")
    return torch.tensor(rows, dtype=torch.long)
