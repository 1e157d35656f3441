"""interp: mechanistic interpretability of CODI's continuous latent thoughts on TransformerLens."""
