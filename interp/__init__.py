"""interp: mechanistic interpretability of CODI's continuous latent thoughts on TransformerLens.

`import interp` is enough for a notebook::

    model = interp.load_default()                      # or interp.load_codi("zen-E/CODI-gpt2")
    pt = interp.trace_pair(model, pair)                # .clean, .corrupted traces
    r = interp.patch(model, pt.corrupted, pt.clean, ("resid_post", 2), 3, "iterative", intervention=interp.Zero())
"""

from interp.engine import STRATEGIES, BatchPatcher, Job, PatchError, PatchResult, Site
from interp.hooks import at_positions
from interp.interventions import Add, Clean, Intervention, Mean, Zero
from interp.layout import SequenceLayout
from interp.loading import CheckpointError, load_codi, load_default
from interp.model import CodiModel, Generation, Trace
from interp.patching import patch, patch_sites
from interp.sweep import SweepConfig, run_sweep
from interp.trace import PairTraces, trace_pair

__all__ = [
    "STRATEGIES",
    "Add",
    "BatchPatcher",
    "CheckpointError",
    "Clean",
    "CodiModel",
    "Generation",
    "Intervention",
    "Job",
    "Mean",
    "PairTraces",
    "PatchError",
    "PatchResult",
    "SequenceLayout",
    "Site",
    "SweepConfig",
    "Trace",
    "Zero",
    "at_positions",
    "load_codi",
    "load_default",
    "patch",
    "patch_sites",
    "run_sweep",
    "trace_pair",
]
