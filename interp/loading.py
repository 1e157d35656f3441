"""Read and validate a CODI checkpoint and build a `CodiModel` around a `HookedTransformer`.

A CODI checkpoint (see ../shared/CODI.md) is the state_dict of the whole CODI module: the language
model under `codi.` (wrapped by peft when trained with LoRA: `codi.base_model.model.`, with
`lora_A/lora_B.default` beside each target's `base_layer`) and the projection MLP under `prj.`.
Every key is accounted for: a missing, unused, duplicated or mis-shaped key is an error that
names it. LoRA is merged (`W + alpha / r * B @ A`) and the merged weights are converted with
TransformerLens's own Llama conversion, without folding or centering anything, so every hook point
sees what the original network computes. No forward passes happen here.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_llama_weights
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PretrainedConfig

from interp.model import CodiModel

CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")
PEFT_PREFIX = "codi.base_model.model."
PLAIN_PREFIX = "codi."
LORA_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.default\.weight$")
BASE_LAYER_RE = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class CheckpointError(ValueError):
    """A CODI checkpoint that does not match the base model or the CODI format."""


def _fmt(keys: list[str] | set[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------- reading files


def read_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file, or the single checkpoint file inside a directory.

    `.bin` files are read with `weights_only=True` (no arbitrary code from pickles).
    """
    path = Path(checkpoint)
    if path.is_dir():
        found = [path / name for name in CHECKPOINT_FILES if (path / name).is_file()]
        if not found:
            raise CheckpointError(
                f"no checkpoint in {path}: expected one of {', '.join(CHECKPOINT_FILES)}. "
                "Pass the directory holding the CODI checkpoint, or the file itself."
            )
        if len(found) > 1:
            raise CheckpointError(
                f"{path} holds both {found[0].name} and {found[1].name}; pass the file you mean."
            )
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the file is unreadable: say which one and why
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} does not hold a flat state_dict of tensors (got {type(state).__name__}); "
            "save the CODI module's state_dict()"
        )
    return state


def load_base(base: Any) -> tuple[LlamaConfig, Any]:
    """The base model's config and tokenizer, from a local directory or (model, tokenizer).

    Only the config and tokenizer are read: the CODI checkpoint holds every weight of the network
    (the frozen base weights too, as `base_layer`), so the base's own weight files are not needed.
    """
    if isinstance(base, (str, Path)):
        base_dir = Path(base)
        if not (base_dir / "config.json").is_file():
            raise CheckpointError(
                f"base {base_dir} has no config.json: pass a local Hugging Face model directory "
                "(config + tokenizer), e.g. a download of meta-llama/Llama-3.2-1B-Instruct"
            )
        config = AutoConfig.from_pretrained(base_dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    elif isinstance(base, tuple) and len(base) == 2:
        model, tokenizer = base
        config = model.config
    else:
        raise TypeError(
            "base must be a local model directory or a (transformers model, tokenizer) tuple, "
            f"got {type(base).__name__}"
        )
    if getattr(config, "model_type", None) != "llama":
        raise CheckpointError(
            f"base model type is {getattr(config, 'model_type', None)!r}; only LLaMA-architecture "
            "bases (model_type 'llama') are supported"
        )
    return config, tokenizer


# ------------------------------------------------------------------------- state dict checks


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a CODI state_dict into (language-model keys without their `codi.` prefix, prj keys)."""
    lm, prj, stray = {}, {}, []
    prefixes = {k.startswith(PEFT_PREFIX) for k in state if k.startswith(PLAIN_PREFIX)}
    if len(prefixes) > 1:
        raise CheckpointError(
            "checkpoint mixes peft-wrapped keys (codi.base_model.model.…) with plain keys (codi.…); "
            "it must be one or the other"
        )
    for key, value in state.items():
        if key.startswith(PEFT_PREFIX):
            lm[key[len(PEFT_PREFIX) :]] = value
        elif key.startswith(PLAIN_PREFIX):
            lm[key[len(PLAIN_PREFIX) :]] = value
        elif key.startswith("prj."):
            prj[key[len("prj.") :]] = value
        else:
            stray.append(key)
    if stray:
        raise CheckpointError(
            f"unused keys outside codi.* and prj.*: {_fmt(stray)}. Is this a CODI checkpoint?"
        )
    if not lm:
        raise CheckpointError("checkpoint holds no codi.* keys (the language model's weights)")
    return lm, prj


def merge_lora(lm: dict[str, torch.Tensor], lora_alpha: float) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Merge every LoRA pair into its base weight: W + (alpha / r) * B @ A.

    Returns the merged weights under plain HF names, and {"rank", "targets"} describing the LoRA
    (rank None when the checkpoint has no LoRA). The rank must be the same for every module.
    """
    merged: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    base_layers: dict[str, torch.Tensor] = {}
    for key, value in lm.items():
        if m := LORA_RE.match(key):
            lora[m["module"]][m["kind"]] = value
        elif m := BASE_LAYER_RE.match(key):
            base_layers[f"{m['module']}.{m['param']}"] = value
        else:
            merged[key] = value
    duplicated = set(base_layers) & set(merged)
    if duplicated:
        raise CheckpointError(
            f"duplicated keys: both a base_layer and a plain weight for {_fmt(duplicated)}"
        )
    merged.update(base_layers)

    incomplete = [f"{m}.{kind}.default.weight" for m, p in lora.items() for kind in ("lora_A", "lora_B") if kind not in p]
    if incomplete:
        raise CheckpointError(f"missing LoRA keys: {_fmt(incomplete)} (every lora_A needs its lora_B)")
    without_base = [f"{m}.base_layer.weight" for m in lora if f"{m}.weight" not in base_layers]
    if without_base:
        raise CheckpointError(f"missing keys: {_fmt(without_base)} (LoRA modules need their base_layer weight)")
    plain_on_lora = [k for k in base_layers if k.rsplit(".", 1)[0] not in lora]
    if plain_on_lora:
        raise CheckpointError(f"unused keys: base_layer weights without LoRA: {_fmt(plain_on_lora)}")

    ranks = {m: p["lora_A"].shape[0] for m, p in lora.items()}
    if len(set(ranks.values())) > 1:
        by_rank: dict[int, list[str]] = defaultdict(list)
        for m, r in ranks.items():
            by_rank[r].append(m)
        detail = "; ".join(f"r={r}: {_fmt(ms, 3)}" for r, ms in sorted(by_rank.items()))
        raise CheckpointError(f"LoRA rank differs between modules ({detail}); CODI uses one rank")
    for module, p in lora.items():
        a, b, w = p["lora_A"], p["lora_B"], merged[f"{module}.weight"]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise CheckpointError(
                f"mis-shaped LoRA for {module}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, "
                f"base weight {tuple(w.shape)}; expected lora_A (r, {w.shape[1]}) and lora_B ({w.shape[0]}, r)"
            )
        rank = a.shape[0]
        merged[f"{module}.weight"] = (w.double() + (lora_alpha / rank) * (b.double() @ a.double())).to(w.dtype)
    targets = sorted({m.rsplit(".", 1)[-1] for m in lora})
    return merged, {"rank": next(iter(ranks.values()), None), "targets": targets}


def expected_shapes(config: LlamaConfig, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """Every HF LlamaForCausalLM parameter name and shape for `config` with `vocab_rows` embeddings."""
    config = LlamaConfig.from_dict({**config.to_dict(), "vocab_size": vocab_rows})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_lm_keys(merged: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Check the merged LM weights against the base config; return them with lm_head filled in."""
    vocab = config.vocab_size
    expected = expected_shapes(config, vocab + 3)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    merged = dict(merged)
    if tied:  # lm_head is the embedding: absent (safetensors) or an identical copy (torch.save)
        expected.pop("lm_head.weight", None)
        head, emb = merged.pop("lm_head.weight", None), merged.get("model.embed_tokens.weight")
        if head is not None and emb is not None and not (head.shape == emb.shape and torch.equal(head, emb)):
            raise CheckpointError(
                "the base ties input and output embeddings, but the checkpoint's lm_head.weight "
                f"{tuple(head.shape)} differs from model.embed_tokens.weight {tuple(emb.shape)}"
            )
    missing = set(expected) - set(merged)
    unused = set(merged) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt(missing)}")
    if unused:
        problems.append(f"unused keys: {_fmt(unused)}")
    if problems:
        raise CheckpointError(
            "the checkpoint does not match the base model's architecture "
            f"({config.num_hidden_layers} layers, d_model {config.hidden_size}): " + "; ".join(problems)
        )
    misshaped = [
        f"{k} {tuple(merged[k].shape)} (expected {shape})"
        for k, shape in expected.items()
        if tuple(merged[k].shape) != shape
    ]
    if misshaped:
        hint = ""
        rows = merged["model.embed_tokens.weight"].shape[0]
        if rows != vocab + 3:
            hint = (
                f" The embedding has {rows} rows; a CODI checkpoint has the base vocabulary "
                f"({vocab}) + 3 (pad, bot, eot)."
            )
        raise CheckpointError(f"mis-shaped keys: {_fmt(misshaped, 5)}.{hint}")
    if tied:
        merged["lm_head.weight"] = merged["model.embed_tokens.weight"]
    return merged


def build_prj(prj_state: dict[str, torch.Tensor], d_model: int) -> nn.Sequential:
    """Rebuild CODI's projection: Dropout -> Linear(d, h) -> GELU -> Linear(h, d) [-> LayerNorm `ln`].

    The hidden size h is read from the keys; the LayerNorm is present only if its keys are.
    """
    need = ["1.weight", "1.bias", "3.weight", "3.bias"]
    missing = [f"prj.{k}" for k in need if k not in prj_state]
    if missing:
        raise CheckpointError(f"missing keys: {_fmt(missing)} (the projection MLP)")
    hidden = prj_state["1.weight"].shape[0]
    prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
    if "ln.weight" in prj_state or "ln.bias" in prj_state:
        prj.add_module("ln", nn.LayerNorm(d_model))
    expected = {k: tuple(v.shape) for k, v in prj.state_dict().items()}
    unused = set(prj_state) - set(expected)
    missing = set(expected) - set(prj_state)
    if unused or missing:
        parts = ([f"unused keys: {_fmt({'prj.' + k for k in unused})}"] if unused else []) + (
            [f"missing keys: {_fmt({'prj.' + k for k in missing})}"] if missing else []
        )
        raise CheckpointError("projection keys do not match Linear-GELU-Linear[-LayerNorm]: " + "; ".join(parts))
    misshaped = [
        f"prj.{k} {tuple(prj_state[k].shape)} (expected {s})" for k, s in expected.items() if tuple(prj_state[k].shape) != s
    ]
    if misshaped:
        raise CheckpointError(f"mis-shaped keys: {_fmt(misshaped, 5)} (d_model is {d_model})")
    prj.load_state_dict(prj_state, strict=True)
    return prj.eval()


# ---------------------------------------------------------------------------- TL conversion


def rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    """The rope settings as one dict (transformers 5 `rope_parameters`, older `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if scaling:
        params = {**scaling, **params}
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def hooked_config(config: LlamaConfig, *, dtype: torch.dtype, device: str | torch.device, n_ctx: int | None = None) -> HookedTransformerConfig:
    """A `HookedTransformerConfig` for a CODI model (vocabulary + 3) built from the HF config."""
    unsupported = {
        "hidden_act": (getattr(config, "hidden_act", "silu"), "silu"),
        "attention_bias": (bool(getattr(config, "attention_bias", False)), False),
        "mlp_bias": (bool(getattr(config, "mlp_bias", False)), False),
    }
    bad = [f"{k}={got!r} (supported: {want!r})" for k, (got, want) in unsupported.items() if got != want]
    rope = rope_parameters(config)
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        bad.append(f"rope_type={rope['rope_type']!r} (supported: {SUPPORTED_ROPE_TYPES})")
    if bad:
        raise CheckpointError("unsupported base architecture: " + ", ".join(bad))
    d_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    vocab = config.vocab_size + 3
    kwargs: dict[str, Any] = dict(
        model_name="codi",
        original_architecture="LlamaForCausalLM",
        n_layers=config.num_hidden_layers,
        d_model=config.hidden_size,
        d_head=d_head,
        n_heads=config.num_attention_heads,
        n_key_value_heads=config.num_key_value_heads,
        d_mlp=config.intermediate_size,
        d_vocab=vocab,
        d_vocab_out=vocab,
        n_ctx=n_ctx or min(config.max_position_embeddings, 4096),
        eps=config.rms_norm_eps,
        act_fn="silu",
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=rope["rope_theta"],
        rotary_adjacent_pairs=False,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        tokenizer_prepends_bos=True,
        default_prepend_bos=False,
        init_weights=False,
        dtype=dtype,
        device=str(device),
    )
    if rope["rope_type"] == "llama3":
        kwargs.update(
            use_NTK_by_parts_rope=True,
            NTK_by_parts_factor=rope["factor"],
            NTK_by_parts_low_freq_factor=rope["low_freq_factor"],
            NTK_by_parts_high_freq_factor=rope["high_freq_factor"],
            NTK_original_ctx_len=rope["original_max_position_embeddings"],
        )
    return HookedTransformerConfig(**kwargs)


def to_hooked_transformer(weights: dict[str, torch.Tensor], config: LlamaConfig, cfg: HookedTransformerConfig) -> HookedTransformer:
    """Convert merged HF Llama weights with TransformerLens's own conversion; no folding/centering."""
    hf_config = LlamaConfig.from_dict({**config.to_dict(), "vocab_size": cfg.d_vocab})
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(hf_config)
    hf_model.load_state_dict(weights, strict=True, assign=True)
    state = convert_llama_weights(hf_model, cfg)
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
    base: Any,
    *,
    lora_alpha: float = 32.0,
    num_latents: int = 6,
    answer_prefix: str = "The answer is:",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    n_ctx: int | None = None,
) -> CodiModel:
    """Load a CODI checkpoint exactly into a `CodiModel` wrapping a `HookedTransformer`.

    Args:
        checkpoint: a directory holding `model.safetensors` or `pytorch_model.bin`, the file
            itself, or an already loaded state_dict, in the official CODI format.
        base: a local Hugging Face directory of the base model (config + tokenizer), or a
            (transformers model, tokenizer) tuple. Nothing reaches the model hub.
        lora_alpha: LoRA alpha (not stored in checkpoints; the official default is 32).
        num_latents: number of latent thoughts (the released checkpoints use 6).
        answer_prefix: the text the model writes after `eot` before the number.
        n_ctx: longest sequence the model will see (default: the base's limit, capped at 4096).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config, tokenizer = load_base(base)
    state = checkpoint if isinstance(checkpoint, dict) else read_state_dict(checkpoint)
    lm, prj_state = split_state_dict(state)
    merged, lora = merge_lora(lm, lora_alpha)
    weights = check_lm_keys(merged, config)
    prj = build_prj(prj_state, config.hidden_size).to(device=device, dtype=dtype)
    cfg = hooked_config(config, dtype=dtype, device=device, n_ctx=n_ctx)
    model = to_hooked_transformer(weights, config, cfg)
    vocab = config.vocab_size
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
    )


EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"


def load_default(*, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> CodiModel:
    """The embedded default model: a small CODI trained by the project (docs/embedded_model.md).

    It ships inside the package in the official CODI format and loads through `load_codi`.
    """
    import json

    meta_path = EMBEDDED_DIR / "codi.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"the embedded model is missing from {EMBEDDED_DIR}; rebuild it with `interp train --preset embedded --out {EMBEDDED_DIR}`"
        )
    meta = json.loads(meta_path.read_text())
    return load_codi(
        EMBEDDED_DIR / "model.safetensors",
        EMBEDDED_DIR / "base",
        num_latents=meta["num_latents"],
        answer_prefix=meta["answer_prefix"],
        dtype=dtype,
        device=device or "cpu",
    )
