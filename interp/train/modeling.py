"""The embedded model's modules, its latent loop, and its checkpoint in the official CODI format.

The network is a `LlamaForCausalLM` built from scratch with V + 3 embedding rows
(pad = V, bot = V+1, eot = V+2, tied with the unembedding) and CODI's projection `prj`:
Dropout -> Linear(d, d) -> GELU -> Linear(d, d) -> LayerNorm (the last registered as `ln`,
so its keys are `prj.1.*`, `prj.3.*`, `prj.ln.*`).

A checkpoint written here is what the official CODI code saves for a model trained WITHOUT
LoRA: one `model.safetensors` holding `codi.<HF Llama key>` for every Llama weight except the
tied `lm_head.weight`, plus `prj.<key>`; and a `codi.json` describing the run.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interp.loading.architectures import ARCHITECTURES
from interp.loading.checkpoint import expected_shapes, prj_module
from interp.train.tokenizer import EOT_ID, V, llama_config


def build_prj(d: int, dropout: float = 0.0) -> nn.Sequential:
    """A fresh CODI projection of width d with its LayerNorm (`interp.loading.checkpoint.prj_module`)."""
    return prj_module(d, d, layer_norm=True, dropout=dropout)


def build_llama(base_config=None, attn_implementation: str = "eager"):
    """A freshly initialised `LlamaForCausalLM` of `base_config`'s shape with V + 3 embedding rows."""
    from transformers import LlamaForCausalLM

    base_config = base_config if base_config is not None else llama_config()
    cfg = copy.deepcopy(base_config)
    cfg.vocab_size = base_config.vocab_size + 3  # same as resize_token_embeddings(V + 3)
    cfg._attn_implementation = attn_implementation
    model = LlamaForCausalLM(cfg)
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError("expected tied input/output embeddings")
    return model


def expected_checkpoint_shapes(base_config, with_prj: bool = True) -> dict[str, tuple[int, ...]]:
    """The key -> shape map of a no-LoRA CODI checkpoint for `base_config` (vocab V, +3 rows stored; the
    tied lm_head not stored): the loader's own expected shapes under `codi.`, and the projection's under `prj.`."""
    hf = expected_shapes(base_config, ARCHITECTURES["llama"], base_config.vocab_size + 3)
    shapes = {f"codi.{k}": shape for k, shape in hf.items() if k != "lm_head.weight"}
    if with_prj:
        shapes.update({f"prj.{k}": tuple(v.shape) for k, v in build_prj(base_config.hidden_size).state_dict().items()})
    return shapes


def checkpoint_state_dict(llama, prj: nn.Module | None) -> dict[str, torch.Tensor]:
    sd = {"codi." + k: v.detach().clone().contiguous() for k, v in llama.state_dict().items() if k != "lm_head.weight"}
    if prj is not None:
        sd.update({"prj." + k: v.detach().clone().contiguous() for k, v in prj.state_dict().items()})
    return sd


def save_checkpoint(out_dir: str | Path, llama, prj: nn.Module | None, meta: dict[str, Any], base_config=None) -> Path:
    """Write `model.safetensors`, `codi.json` and `base/` (config + tokenizer, no weights) to `out_dir`."""
    from safetensors.torch import save_file

    from interp.train.tokenizer import save_base_dir

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint_state_dict(llama, prj), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "codi.json").write_text(json.dumps(meta, indent=2) + "\n")
    save_base_dir(out / "base", base_config)
    return out


def load_checkpoint(ckpt: str | Path, base_dir: str | Path, attn_implementation: str = "eager"):
    """(llama, prj) from a checkpoint written by `save_checkpoint`; fails on any key or shape mismatch.

    `prj` is None for a checkpoint without `prj.*` keys (the direct-answer baseline).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    base_config = AutoConfig.from_pretrained(base_dir)
    sd = load_file(str(ckpt))
    with_prj = any(k.startswith("prj.") for k in sd)
    expected = expected_checkpoint_shapes(base_config, with_prj)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        bad = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise ValueError(f"checkpoint {ckpt} does not match {base_dir}: missing={missing} unused={extra} misshaped={bad}")
    llama = build_llama(base_config, attn_implementation)
    llama.load_state_dict({k[len("codi.") :]: v for k, v in sd.items() if k.startswith("codi.")}, strict=False)
    # strict=False only because lm_head.weight is tied (absent); verify everything else was loaded
    names = set(llama.state_dict()) - {"lm_head.weight"}
    if names != {k[len("codi.") :] for k in sd if k.startswith("codi.")}:
        raise ValueError("llama keys did not match the checkpoint")
    prj = None
    if with_prj:
        prj = build_prj(base_config.hidden_size)
        prj.load_state_dict({k[len("prj.") :]: v for k, v in sd.items() if k.startswith("prj.")}, strict=True)
        prj.eval()
    llama.eval()
    return llama, prj


@dataclass
class LatentRun:
    """What the batched latent loop produced (kept for losses and analyses)."""

    cache: Any  # the KV cache after question + bot + latents
    latents: torch.Tensor  # [B, K, d] the fed latent embeddings
    latent_states: list[tuple[torch.Tensor, ...]]  # per latent t: hidden states (n_layers+1) at its position, [B, d] each
    bot_final: torch.Tensor  # [B, d] final-normed state at bot


def run_latents(llama, prj, prompt_ids: torch.Tensor, num_latents: int, latents_override=None) -> LatentRun:
    """Batched CODI latent loop on `prompt_ids` (`<s> question <bot>`, equal lengths, no padding).

    latent 1 = prj(final-normed state at bot); latent t+1 = prj(final-normed state at latent t).
    `latents_override`: None, a [K, d] / [B, K, d] tensor replacing every latent, or a dict
    {t (0-based): [d] or [B, d]} replacing only those latents (later ones are recomputed).
    """
    out = llama(input_ids=prompt_ids, use_cache=True, output_hidden_states=True)
    cache = out.past_key_values
    h = out.hidden_states[-1][:, -1]
    bot_final = h
    B = prompt_ids.shape[0]
    fed, states = [], []
    for t in range(num_latents):
        lat = prj(h)
        ov = _override_at(latents_override, t)
        if ov is not None:
            lat = ov.to(lat.dtype).expand(B, -1) if ov.dim() == 1 else ov.to(lat.dtype)
        fed.append(lat)
        out = llama(inputs_embeds=lat[:, None], use_cache=True, output_hidden_states=True, **cache_kwargs(llama, cache))
        cache = out.past_key_values
        states.append(tuple(hs[:, -1] for hs in out.hidden_states))
        h = out.hidden_states[-1][:, -1]
    latents = torch.stack(fed, 1) if fed else prompt_ids.new_zeros((B, 0, llama.config.hidden_size), dtype=torch.float)
    return LatentRun(cache, latents, states, bot_final)


def cache_kwargs(llama, cache) -> dict:
    """`{cache: ...}` for transformers versions that renamed `past_key_values` to `cache`, else the old name."""
    import inspect

    name = "cache" if "cache" in inspect.signature(llama.forward).parameters else "past_key_values"
    return {name: cache}


def _override_at(override, t: int):
    if override is None:
        return None
    if isinstance(override, dict):
        return override.get(t)
    return override[..., t, :]


def restrict_logits(logits: torch.Tensor) -> torch.Tensor:
    """The official decoding restriction: drop the last vocab row (eot), i.e. ids < V + 2."""
    return logits[..., :EOT_ID]


__all__ = [
    "V",
    "build_prj",
    "build_llama",
    "expected_checkpoint_shapes",
    "checkpoint_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "run_latents",
    "restrict_logits",
    "cache_kwargs",
    "LatentRun",
]
