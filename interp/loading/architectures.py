"""Every architecture-specific fact of loading, in one table keyed by the base's HF `model_type`.

An `Architecture` says which HF class names the checkpoint's keys, which TransformerLens conversion
turns the merged HF weights into a `HookedTransformer` state dict, which modules the official CODI
code wraps with LoRA (and whether they are GPT-2's `Conv1D`, whose weight is stored [in, out] so the
merged LoRA delta is transposed), and its input embedding's key. `hooked_config` builds the `HookedTransformerConfig` from the HF config
by hand (vocabulary + 3 for pad, bot, eot): TransformerLens's own table fixes the vocabulary size by
model name and so cannot describe a CODI model.

Bases outside the table are refused with the list of those that load. Qwen2 and Mistral are not in
it: their conversions were not checked against HF logits here (see README, "Using it").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import (
    convert_gpt2_weights,
    convert_llama_weights,
)
from transformers import (
    GPT2LMHeadModel,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from interp.loading.checkpoint import CheckpointError

SUPPORTED_ROPE_TYPES = ("default", "llama3")
#: HF GPT-2 activation names whose TransformerLens function of the same name computes the same thing
GPT2_ACTIVATIONS = ("gelu_new", "gelu", "relu")

HookedConfigBuilder = Callable[..., HookedTransformerConfig]


@dataclass(frozen=True)
class Architecture:
    """How one HF `model_type` loads into TransformerLens.

    hf_class: the HF causal-LM class whose state_dict names the checkpoint's `codi.*` keys.
    converter: TransformerLens's weight conversion (HF model -> HookedTransformer state dict).
    lora_targets: the module names the official CODI code wraps with LoRA for this architecture.
    conv1d: the LoRA targets are `Conv1D` (weight [in, out], peft's fan_in_fan_out): delta (B @ A).T.
    embed_key: the input embedding's key (rows: base vocabulary + 3).
    constant_buffers: key suffixes of non-weight buffers that older saves include (ignored).
    """

    model_type: str
    hf_class: type[PreTrainedModel]
    converter: Callable[[Any, HookedTransformerConfig], dict[str, torch.Tensor]]
    lora_targets: tuple[str, ...]
    conv1d: bool
    embed_key: str
    hooked_config: HookedConfigBuilder
    constant_buffers: tuple[str, ...] = ()


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


def _refuse(bad: list[str], model_type: str) -> None:
    if bad:
        raise CheckpointError(f"unsupported {model_type} base: " + ", ".join(bad))


def llama_hooked_config(config: PretrainedConfig, *, dtype: torch.dtype, device: str | torch.device, n_ctx: int | None = None, vocab_rows: int | None = None) -> HookedTransformerConfig:
    """A `HookedTransformerConfig` for a LLaMA-architecture CODI model (vocabulary + 3)."""
    unsupported = {
        "hidden_act": (getattr(config, "hidden_act", "silu"), "silu"),
        "attention_bias": (bool(getattr(config, "attention_bias", False)), False),
        "mlp_bias": (bool(getattr(config, "mlp_bias", False)), False),
    }
    bad = [f"{k}={got!r} (supported: {want!r})" for k, (got, want) in unsupported.items() if got != want]
    rope = rope_parameters(config)
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        bad.append(f"rope_type={rope['rope_type']!r} (supported: {SUPPORTED_ROPE_TYPES})")
    _refuse(bad, "llama")
    d_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    vocab = config.vocab_size + 3 if vocab_rows is None else vocab_rows
    kwargs: dict[str, Any] = {
        "model_name": "codi",
        "original_architecture": "LlamaForCausalLM",
        "n_layers": config.num_hidden_layers,
        "d_model": config.hidden_size,
        "d_head": d_head,
        "n_heads": config.num_attention_heads,
        "n_key_value_heads": config.num_key_value_heads,
        "d_mlp": config.intermediate_size,
        "d_vocab": vocab,
        "d_vocab_out": vocab,
        "n_ctx": n_ctx or min(config.max_position_embeddings, 4096),
        "eps": config.rms_norm_eps,
        "act_fn": "silu",
        "normalization_type": "RMS",
        "final_rms": True,
        "gated_mlp": True,
        "positional_embedding_type": "rotary",
        "rotary_dim": d_head,
        "rotary_base": rope["rope_theta"],
        "rotary_adjacent_pairs": False,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "tokenizer_prepends_bos": True,
        "default_prepend_bos": False,
        "init_weights": False,
        "dtype": dtype,
        "device": str(device),
    }
    if rope["rope_type"] == "llama3":
        kwargs.update(
            use_NTK_by_parts_rope=True,
            NTK_by_parts_factor=rope["factor"],
            NTK_by_parts_low_freq_factor=rope["low_freq_factor"],
            NTK_by_parts_high_freq_factor=rope["high_freq_factor"],
            NTK_original_ctx_len=rope["original_max_position_embeddings"],
        )
    return HookedTransformerConfig(**kwargs)


def gpt2_hooked_config(config: PretrainedConfig, *, dtype: torch.dtype, device: str | torch.device, n_ctx: int | None = None, vocab_rows: int | None = None) -> HookedTransformerConfig:
    """A `HookedTransformerConfig` for a GPT-2 CODI model (vocabulary + 3, learned positions, LayerNorm).

    `n_ctx` defaults to the base's `n_positions` (the rows of `W_pos`); a smaller value keeps the
    first `n_ctx` rows.
    """
    bad = []
    if config.activation_function not in GPT2_ACTIVATIONS:
        bad.append(f"activation_function={config.activation_function!r} (supported: {GPT2_ACTIVATIONS})")
    for name, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if bool(getattr(config, name, want)) != want:
            bad.append(f"{name}={getattr(config, name)!r} (supported: {want!r})")
    if n_ctx is not None and n_ctx > config.n_positions:
        bad.append(f"n_ctx={n_ctx} exceeds the base's {config.n_positions} learned positions")
    _refuse(bad, "gpt2")
    vocab = config.vocab_size + 3 if vocab_rows is None else vocab_rows
    return HookedTransformerConfig(
        model_name="codi",
        original_architecture="GPT2LMHeadModel",
        n_layers=config.n_layer,
        d_model=config.n_embd,
        d_head=config.n_embd // config.n_head,
        n_heads=config.n_head,
        d_mlp=config.n_inner or 4 * config.n_embd,
        d_vocab=vocab,
        d_vocab_out=vocab,
        n_ctx=n_ctx or config.n_positions,
        eps=config.layer_norm_epsilon,
        act_fn=config.activation_function,
        normalization_type="LN",
        positional_embedding_type="standard",
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        tokenizer_prepends_bos=False,
        default_prepend_bos=False,
        init_weights=False,
        dtype=dtype,
        device=str(device),
    )


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(
        model_type="llama",
        hf_class=LlamaForCausalLM,
        converter=convert_llama_weights,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"),
        conv1d=False,
        embed_key="model.embed_tokens.weight",
        hooked_config=llama_hooked_config,
    ),
    "gpt2": Architecture(
        model_type="gpt2",
        hf_class=GPT2LMHeadModel,
        converter=convert_gpt2_weights,
        lora_targets=("c_attn", "c_proj", "c_fc"),
        conv1d=True,
        embed_key="transformer.wte.weight",
        hooked_config=gpt2_hooked_config,
        constant_buffers=(".attn.bias", ".attn.masked_bias"),  # causal mask and -1e4 of transformers < 4.3x saves
    ),
}


def architecture(config: PretrainedConfig) -> Architecture:
    """The table entry for a base config; a clear refusal naming the types that load otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"base model type is {model_type!r}; CODI bases of type {', '.join(repr(k) for k in ARCHITECTURES)} load (LLaMA-architecture models such as Llama-3.2 and SmolLM2, and GPT-2)"
        )
    return ARCHITECTURES[model_type]


def hooked_config(config: PretrainedConfig, *, dtype: torch.dtype, device: str | torch.device, n_ctx: int | None = None, vocab_rows: int | None = None) -> HookedTransformerConfig:
    """A `HookedTransformerConfig` on the base `config` with `vocab_rows` embedding rows (default: CODI's vocabulary + 3)."""
    return architecture(config).hooked_config(config, dtype=dtype, device=device, n_ctx=n_ctx, vocab_rows=vocab_rows)
