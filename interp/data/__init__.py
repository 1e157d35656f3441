"""Clean/corrupted problem pairs: the synthetic arithmetic task, GSM8K, token alignment, files."""

from interp.data.align import AlignedPair, align, filter_by_model
from interp.data.arithmetic import arithmetic_pairs
from interp.data.gsm8k import gsm8k_pairs
from interp.data.pairs import NumberChange, Pair, load_pairs, save_pairs
from interp.data.three_step import three_step_pairs

__all__ = [
    "AlignedPair",
    "NumberChange",
    "Pair",
    "align",
    "arithmetic_pairs",
    "filter_by_model",
    "gsm8k_pairs",
    "load_pairs",
    "save_pairs",
    "three_step_pairs",
]
