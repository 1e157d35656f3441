"""interp: mechanistic interpretability of continuous latent thoughts (CODI, Coconut) on TransformerLens.

`import interp` is enough for a notebook::

    model = interp.load_default()                      # or interp.load_model("zen-E/CODI-gpt2"), interp.load_coconut(path, "gpt2")
    pt = interp.trace_pair(model, pair)                # .clean, .corrupted traces
    r = interp.patch(model, pt.corrupted, pt.clean, ("resid_post", 2), 3, "iterative", intervention=interp.Zero())
"""

from interp.attribution import attribute, decompose, verify_top_k
from interp.engine import STRATEGIES, BatchPatcher, Job, PatchError, PatchResult, Site
from interp.family import COCONUT, CODI, Family
from interp.hooks import at_positions
from interp.interventions import Add, Clean, Intervention, Mean, Zero
from interp.layout import SequenceLayout
from interp.loading import CheckpointError, load_coconut, load_codi, load_default, load_model
from interp.model import Generation, LatentModel, Trace
from interp.patching import patch, patch_sites
from interp.shipped import SHIPPED, load_shipped
from interp.sweep import SweepConfig, run_sweep, sweep
from interp.trace import PairTraces, trace_pair

#: the name of `LatentModel` before a second family existed
CodiModel = LatentModel

__all__ = [
    "STRATEGIES",
    "Add",
    "BatchPatcher",
    "COCONUT",
    "CODI",
    "CheckpointError",
    "Clean",
    "CodiModel",
    "Family",
    "Generation",
    "Intervention",
    "Job",
    "LatentModel",
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
    "attribute",
    "decompose",
    "load_coconut",
    "load_codi",
    "load_default",
    "load_shipped",
    "SHIPPED",
    "load_model",
    "patch",
    "patch_sites",
    "run_sweep",
    "sweep",
    "trace_pair",
    "verify_top_k",
]
