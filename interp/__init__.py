"""interp: mechanistic interpretability of CODI's continuous latent thoughts on TransformerLens."""

from interp.loading import CheckpointError, load_codi, load_default
from interp.model import CodiModel, Generation, Trace

__all__ = ["CheckpointError", "CodiModel", "Generation", "Trace", "load_codi", "load_default"]
