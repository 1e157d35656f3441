"""Load a CODI checkpoint exactly into a `CodiModel` wrapping a `HookedTransformer`.

`load_codi(checkpoint, base)` takes local paths or Hugging Face hub ids (`hub`), reads the base's
config and tokenizer, picks the architecture's entry in one table (`architectures`), checks every
checkpoint key and merges LoRA (`checkpoint`), and converts the merged HF weights with
TransformerLens's own conversion for that architecture, without folding or centering anything, so
every hook point sees what the original network computes (latents read the final-normed state,
LayerNorm weight and bias included). No forward passes happen here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from interp.loading.architectures import (
    ARCHITECTURES,
    Architecture,
    architecture,
    hooked_config,
    rope_parameters,
)
from interp.loading.checkpoint import (
    CHECKPOINT_FILES,
    CheckpointError,
    build_prj,
    check_architecture,
    check_finite,
    check_lm_keys,
    merge_lora,
    read_state_dict,
    split_state_dict,
)
from interp.loading.hub import (
    OFFICIAL_BASES,
    Resolved,
    default_base,
    is_hub_id,
    resolve_base,
    resolve_checkpoint,
)
from interp.model import CodiModel

__all__ = [
    "ARCHITECTURES",
    "CHECKPOINT_FILES",
    "OFFICIAL_BASES",
    "Architecture",
    "CheckpointError",
    "architecture",
    "hooked_config",
    "load_base",
    "load_codi",
    "load_default",
    "read_state_dict",
    "rope_parameters",
]


def load_base(base: Any, revision: str | None = None) -> tuple[PretrainedConfig, Any, Resolved | None]:
    """The base model's config and tokenizer: a local directory, a hub id, or (model, tokenizer).

    Only the config and tokenizer are read: the CODI checkpoint holds every weight of the network
    (the frozen base weights too, as `base_layer`), so the base's own weight files are not needed.
    Returns (config, tokenizer, where it was found; None for a (model, tokenizer) tuple).
    """
    if isinstance(base, (str, Path)):
        found = resolve_base(base, revision)
        if not (found.path / "config.json").is_file():
            raise CheckpointError(f"base {found.path} has no config.json: pass a Hugging Face model directory or hub id (config + tokenizer), e.g. gpt2 or meta-llama/Llama-3.2-1B-Instruct")
        config = AutoConfig.from_pretrained(found.path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(found.path, local_files_only=True)
        return config, tokenizer, found
    if isinstance(base, tuple) and len(base) == 2:
        model, tokenizer = base
        return model.config, tokenizer, None
    raise TypeError(f"base must be a local model directory, a hub id or a (transformers model, tokenizer) tuple, got {type(base).__name__}")


def with_pad_token(tokenizer: Any, pad_id: int) -> Any:
    """The tokenizer with a pad token, as the official code sets it: `[PAD]` added if it has none.

    The official code adds `[PAD]` (the next free id, V for Llama-3 and GPT-2 tokenizers) and sets
    the pad id to V. A copy is changed; the caller's tokenizer is left as it is.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.pad_token_id = pad_id
    return tokenizer


def to_hooked_transformer(weights: dict[str, torch.Tensor], config: PretrainedConfig, arch: Architecture, cfg: HookedTransformerConfig) -> HookedTransformer:
    """Convert merged HF weights with TransformerLens's conversion for `arch`; no folding/centering."""
    hf_config = type(config).from_dict({**config.to_dict(), "vocab_size": cfg.d_vocab})
    with torch.device("meta"):
        hf_model = arch.hf_class(hf_config)
    hf_model.load_state_dict(weights, strict=True, assign=True)
    state = arch.converter(hf_model, cfg)
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=True)
    model.load_and_process_state_dict(
        {k: v.detach().to(cfg.dtype) for k, v in state.items()},
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()


def load_codi(
    checkpoint: str | Path | dict[str, torch.Tensor],
    base: Any = None,
    *,
    lora_alpha: float = 32.0,
    num_latents: int = 6,
    remove_eos: bool = True,
    answer_prefix: str = "The answer is:",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    n_ctx: int | None = None,
    revision: str | None = None,
    base_revision: str | None = None,
) -> CodiModel:
    """Load a CODI checkpoint exactly into a `CodiModel` wrapping a `HookedTransformer`.

    Args:
        checkpoint: a hub id (`"zen-E/CODI-gpt2"`, `"zen-E/CODI-llama3.2-1b-Instruct"`), a directory
            holding `model.safetensors` or `pytorch_model.bin`, the file itself, or an already
            loaded state_dict, in the official CODI format.
        base: the base model: a hub id, a local Hugging Face directory (config + tokenizer), or a
            (transformers model, tokenizer) tuple. Defaults, for the official releases only, to the
            base they were trained on (`interp.loading.OFFICIAL_BASES`).
        lora_alpha: LoRA alpha. Checkpoints do not store it; the released scripts use 32 (our
            default), the official code's own default is 16. The LoRA scale is alpha / rank.
        num_latents: number of latent thoughts (the released checkpoints use 6).
        remove_eos: True (the released scripts' `--remove_eos True`): [question, bot] and [eot]
            before decoding. False (the official code's default): [question, eos, bot] and
            [eot, eos]; a checkpoint trained with that default needs it.
        answer_prefix: the text the model writes after `eot` before the number.
        n_ctx: longest sequence the model will see (default: the base's limit, capped at 4096 for
            rotary models; GPT-2: its learned positions).
        revision, base_revision: hub revision (branch, tag or commit hash) of the checkpoint / base.

    Hub ids resolve through the Hugging Face cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE); see
    `interp.loading.hub`. What was loaded, and how, is in the model's `load_options`.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if base is None:
        if isinstance(checkpoint, dict) or not is_hub_id(str(checkpoint)):
            raise CheckpointError(
                "base= is required for a local checkpoint: pass the local directory or hub id of the model it was "
                f"trained on (defaults exist only for the official hub ids {', '.join(OFFICIAL_BASES)})"
            )
        base = default_base(str(checkpoint))
    found = None if isinstance(checkpoint, dict) else resolve_checkpoint(checkpoint, revision)
    config, tokenizer, base_found = load_base(base, base_revision)
    arch = architecture(config)
    state = checkpoint if found is None else read_state_dict(found.path)
    if (revision is not None and (found is None or found.repo_id is None)) or (base_revision is not None and (base_found is None or base_found.repo_id is None)):
        raise CheckpointError("revision= and base_revision= apply to hub ids only; a local path is read as it is")
    check_finite(state)
    lm, prj_state = split_state_dict(state)
    check_architecture(lm, arch)
    merged, lora = merge_lora(lm, lora_alpha, arch)
    weights = check_lm_keys(merged, config, arch)
    prj = build_prj(prj_state, config.hidden_size).to(device=device, dtype=dtype)
    cfg = arch.hooked_config(config, dtype=dtype, device=device, n_ctx=n_ctx)
    model = to_hooked_transformer(weights, config, arch, cfg)
    vocab = config.vocab_size
    tokenizer = with_pad_token(tokenizer, vocab)
    eos = tokenizer.eos_token_id
    if not remove_eos and eos is None:
        raise CheckpointError("remove_eos=False feeds the tokenizer's eos token, but the base tokenizer has none")
    suffix = () if remove_eos else (int(eos),)
    options = {
        "checkpoint": found.provenance() if found is not None else "state_dict",
        "base": base_found.provenance() if base_found is not None else "(model, tokenizer)",
        "model_type": arch.model_type,
        "lora_alpha": float(lora_alpha),
        "lora_rank": lora["rank"],
        "num_latents": num_latents,
        "remove_eos": remove_eos,
        "answer_prefix": answer_prefix,
        "dtype": str(dtype).removeprefix("torch."),
        "n_ctx": cfg.n_ctx,
    }
    return CodiModel(
        model=model,
        tokenizer=tokenizer,
        prj=prj,
        pad_id=vocab,
        bot_id=vocab + 1,
        eot_id=vocab + 2,
        num_latents=num_latents,
        answer_prefix=answer_prefix,
        lora=lora,
        question_suffix_ids=suffix,
        eot_suffix_ids=suffix,
        load_options=options,
    )


EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "embedded"


def load_default(*, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> CodiModel:
    """The embedded default model: a small CODI trained by the project (docs/embedded_model.md).

    It ships inside the package in the official CODI format and loads through `load_codi`.
    """
    import json

    meta_path = EMBEDDED_DIR / "codi.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"the embedded model is missing from {EMBEDDED_DIR}; rebuild it with `interp train --preset embedded --out {EMBEDDED_DIR}`")
    meta = json.loads(meta_path.read_text())
    return load_codi(
        EMBEDDED_DIR / "model.safetensors",
        EMBEDDED_DIR / "base",
        num_latents=meta["num_latents"],
        answer_prefix=meta["answer_prefix"],
        dtype=dtype,
        device=device or "cpu",
    )
