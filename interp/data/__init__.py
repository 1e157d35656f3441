"""Clean/corrupted problem pairs: the synthetic arithmetic task, GSM8K, ProsQA, token alignment, files;
Coconut's data formats (ProsQA JSON, GSM8K-Aug iCoT text)."""

from interp.data.align import AlignedPair, align, align_to_model, filter_by_model
from interp.data.arithmetic import arithmetic_pairs
from interp.data.gsm8k import gsm8k_pairs
from interp.data.gsm8k_aug import gsm8k_to_icot, read_icot, write_icot
from interp.data.pairs import NumberChange, Pair, load_pairs, save_pairs
from interp.data.prosqa import ProsQAProblem, check_prosqa, generate_prosqa, load_prosqa, prosqa_pairs, save_prosqa
from interp.data.prosqa import solve as solve_prosqa
from interp.data.three_step import three_step_pairs

__all__ = [
    "AlignedPair",
    "NumberChange",
    "Pair",
    "ProsQAProblem",
    "align",
    "align_to_model",
    "arithmetic_pairs",
    "check_prosqa",
    "filter_by_model",
    "generate_prosqa",
    "gsm8k_pairs",
    "gsm8k_to_icot",
    "load_pairs",
    "load_prosqa",
    "prosqa_pairs",
    "read_icot",
    "save_pairs",
    "save_prosqa",
    "solve_prosqa",
    "three_step_pairs",
    "write_icot",
]
