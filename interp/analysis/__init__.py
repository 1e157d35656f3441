"""What each latent holds and how the latents talk: logit lens, linear probes, attention flow and knockout.

from interp.analysis import analyze, problems_from_pairs
analyze(model, problems_from_pairs(pairs), "results/analysis")   # -> analysis.json, report.html
"""

from interp.analysis.activations import Activations, Problem, collect, problems_from_pairs
from interp.analysis.attention import attention_rows, knockout_generate, knockout_rows
from interp.analysis.lens import logit_lens
from interp.analysis.probes import probe_rows
from interp.analysis.run import analyze, write_analysis_report

__all__ = [
    "Activations",
    "Problem",
    "analyze",
    "attention_rows",
    "collect",
    "knockout_generate",
    "knockout_rows",
    "logit_lens",
    "probe_rows",
    "problems_from_pairs",
    "write_analysis_report",
]
