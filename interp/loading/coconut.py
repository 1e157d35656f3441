"""Read a Coconut checkpoint (the official training's format) and check every key; add the markers.

The official `run.py` writes `torch.save(model.state_dict(), f"checkpoint_{epoch}")` of its
`Coconut` module: the base causal LM under `base_causallm.` (full fine-tuning, no LoRA, no
projection) and `embedding.weight`, the same tensor as the base's input embedding (the module is
registered twice). The base tokenizer gets `<|start-latent|>`, `<|end-latent|>`, `<|latent|>` added
in that order (`add_tokens`), then the embedding is resized to `len(tokenizer)`, with
`pad_token = eos_token`. The official loader uses `strict=False`; here every key is accounted for.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from interp.loading.checkpoint import CheckpointError, _fmt

if TYPE_CHECKING:
    from interp.loading.architectures import Architecture

COCONUT_PREFIX = "base_causallm."
EMBEDDING_KEY = "embedding.weight"
#: the markers the official code adds, in its order: start, end, latent
MARKERS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")


def family_of(state: dict[str, torch.Tensor]) -> str:
    """ "codi" (`codi.*` + `prj.*` keys) or "coconut" (`base_causallm.*`); a one-line refusal otherwise.

    A checkpoint with the base's own keys (`transformer.*`, `model.*`, `lm_head.weight`) is a plain
    model: the official Coconut code's CoT, no-CoT or pause-as-thought runs, or a base model.
    """
    codi = any(k.startswith(("codi.", "prj.")) for k in state)
    coconut = any(k.startswith(COCONUT_PREFIX) for k in state)
    if codi and coconut:
        raise CheckpointError("checkpoint mixes CODI keys (codi.*, prj.*) with Coconut keys (base_causallm.*): save one model's state_dict()")
    if codi:
        return "codi"
    if coconut:
        return "coconut"
    if any(k.startswith(("transformer.", "model.", "lm_head.")) for k in state):
        raise CheckpointError(
            "checkpoint holds a plain causal LM (keys transformer.* / model.* / lm_head.weight, no codi.* or base_causallm.*): "
            "a CoT, no-CoT or pause checkpoint of the Coconut code, or a base model, with no continuous thoughts; "
            "load it with transformers, or pass a CODI (codi.* + prj.*) or Coconut (base_causallm.*) checkpoint"
        )
    raise CheckpointError(f"checkpoint keys {_fmt(list(state), 4)} are neither CODI's (codi.*, prj.*) nor Coconut's (base_causallm.*, embedding.weight)")


def split_coconut_state(state: dict[str, torch.Tensor], arch: Architecture) -> dict[str, torch.Tensor]:
    """The base LM's HF weights (without `base_causallm.`); `embedding.weight` must equal the LM's
    input embedding (the official module holds one tensor under both names)."""
    lm = {k[len(COCONUT_PREFIX) :]: v for k, v in state.items() if k.startswith(COCONUT_PREFIX)}
    stray = [k for k in state if not k.startswith(COCONUT_PREFIX) and k != EMBEDDING_KEY]
    if stray:
        raise CheckpointError(f"unused keys outside base_causallm.* and embedding.weight: {_fmt(stray)}. Is this a Coconut checkpoint?")
    if EMBEDDING_KEY not in state:
        raise CheckpointError(f"missing key {EMBEDDING_KEY} (the Coconut module's own reference to the input embedding): save the whole Coconut module's state_dict()")
    embedding, own = state[EMBEDDING_KEY], lm.get(arch.embed_key)
    if own is not None and not (embedding.shape == own.shape and torch.equal(embedding, own)):
        raise CheckpointError(
            f"{EMBEDDING_KEY} {tuple(embedding.shape)} differs from base_causallm.{arch.embed_key} {tuple(own.shape)}: in a Coconut checkpoint they are one tensor; the file was edited or mis-saved"
        )
    return lm


def with_markers(tokenizer: Any) -> tuple[Any, dict[str, int]]:
    """A copy of the base tokenizer with the three markers as the official code adds them, and their ids.

    A tokenizer that already holds all three (saved after training) is used as it is; one that holds
    only some is refused, naming the missing ones. `pad_token` is set to `eos_token`, as `run.py` does.
    """
    tokenizer = copy.deepcopy(tokenizer)
    vocab = tokenizer.get_vocab()
    present = [m for m in MARKERS if m in vocab]
    if present and len(present) < len(MARKERS):
        missing = [m for m in MARKERS if m not in vocab]
        raise CheckpointError(
            f"the base tokenizer holds {', '.join(present)} but not {', '.join(missing)}: give the original base tokenizer (the loader adds all three) or the one saved with the checkpoint"
        )
    if tokenizer.eos_token is None:
        raise CheckpointError("the base tokenizer has no eos token; Coconut pads with eos and stops decoding at it: give the base's own tokenizer")
    tokenizer.pad_token = tokenizer.eos_token
    for marker in MARKERS if not present else ():
        tokenizer.add_tokens(marker)
    return tokenizer, {m: int(tokenizer.convert_tokens_to_ids(m)) for m in MARKERS}
