"""Read a CODI checkpoint and check every key: split, finite values, LoRA merge, shapes, prj.

A CODI checkpoint (see ../shared/CODI.md) is the state_dict of the whole CODI module: the language
model under `codi.` (wrapped by peft when trained with LoRA: `codi.base_model.model.`, with
`lora_A/lora_B.default` beside each target's `base_layer`) and the projection MLP under `prj.`.
Every key is accounted for: a missing, unused, duplicated, mis-shaped or non-finite key is an error
that names it. LoRA is merged (`W + alpha / r * B @ A`; transposed for GPT-2's `Conv1D`, whose
weight is [in, out]) in float64 before anything is split or converted.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PretrainedConfig

if TYPE_CHECKING:
    from interp.loading.architectures import Architecture

CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")
#: the files the official Coconut training writes, one per epoch: `torch.save(model.state_dict())`, no extension
COCONUT_FILE_RE = re.compile(r"^checkpoint_(\d+)$")
PEFT_PREFIX = "codi.base_model.model."
PLAIN_PREFIX = "codi."
LORA_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.default\.weight$")
BASE_LAYER_RE = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")


class CheckpointError(ValueError):
    """A checkpoint that does not match the base model or its family's format."""


def _fmt(keys: list[str] | set[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def checkpoint_file(checkpoint: str | Path) -> Path:
    """The file a checkpoint path names: the file itself, or in a directory its CODI file
    (`model.safetensors` or `pytorch_model.bin`) or the latest Coconut `checkpoint_N` (highest N)."""
    path = Path(checkpoint)
    if not path.is_dir():
        return path
    found = [path / name for name in CHECKPOINT_FILES if (path / name).is_file()]
    epochs = sorted((int(m[1]), q) for q in path.iterdir() if q.is_file() and (m := COCONUT_FILE_RE.match(q.name)))
    if found and epochs:
        raise CheckpointError(f"{path} holds both {found[0].name} (CODI) and {epochs[-1][1].name} (Coconut); pass the file you mean.")
    if epochs:
        return epochs[-1][1]
    if not found:
        raise CheckpointError(
            f"no checkpoint in {path}: expected one of {', '.join(CHECKPOINT_FILES)} (CODI) or checkpoint_N files (Coconut). Pass the directory holding the checkpoint, or the file itself."
        )
    if len(found) > 1:
        raise CheckpointError(f"{path} holds both {found[0].name} and {found[1].name}; pass the file you mean.")
    return found[0]


def read_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file, or the checkpoint file inside a directory (`checkpoint_file`).

    Pickled files (`.bin`, Coconut's `checkpoint_N`) are read with `weights_only=True` (no
    arbitrary code from pickles).
    """
    path = checkpoint_file(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the file is unreadable: say which one and why
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}; a truncated or half-downloaded file reads so: download or save it again") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state_dict of tensors (got {type(state).__name__}); save the CODI or Coconut module's state_dict()")
    return state


def check_finite(state: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint with NaN or Inf in any floating-point tensor, naming the tensors."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"non-finite values (NaN or Inf) in {_fmt(bad)}: the checkpoint is corrupt (diverged training or a broken conversion); use another save of the model")


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a CODI state_dict into (language-model keys without their `codi.` prefix, prj keys)."""
    lm, prj, stray = {}, {}, []
    prefixes = {k.startswith(PEFT_PREFIX) for k in state if k.startswith(PLAIN_PREFIX)}
    if len(prefixes) > 1:
        raise CheckpointError("checkpoint mixes peft-wrapped keys (codi.base_model.model.…) with plain keys (codi.…); it must be one or the other")
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
        raise CheckpointError(f"unused keys outside codi.* and prj.*: {_fmt(stray)}. Is this a CODI checkpoint?")
    if not lm:
        raise CheckpointError("checkpoint holds no codi.* keys (the language model's weights)")
    return lm, prj


def merge_lora(lm: dict[str, torch.Tensor], lora_alpha: float, arch: Architecture) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Merge every LoRA pair into its base weight: W + (alpha / r) * B @ A ((B @ A).T for Conv1D).

    lora_A is [r, in] and lora_B [out, r] for both module kinds; a Linear weight is [out, in], a
    Conv1D weight [in, out]. Returns the merged weights under plain HF names, and
    {"rank", "targets"} describing the LoRA (rank None when the checkpoint has no LoRA). The rank
    must be the same for every module, and LoRA may wrap only the architecture's CODI targets.
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
        raise CheckpointError(f"duplicated keys: both a base_layer and a plain weight for {_fmt(duplicated)}")
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
    off_target = [m for m in lora if m.rsplit(".", 1)[-1] not in arch.lora_targets]
    if off_target:
        raise CheckpointError(f"LoRA on modules that CODI does not wrap in a {arch.model_type} model: {_fmt(off_target)} (targets: {', '.join(arch.lora_targets)}). Is the base the checkpoint's own?")

    ranks = {m: p["lora_A"].shape[0] for m, p in lora.items()}
    if len(set(ranks.values())) > 1:
        by_rank: dict[int, list[str]] = defaultdict(list)
        for m, r in ranks.items():
            by_rank[r].append(m)
        detail = "; ".join(f"r={r}: {_fmt(ms, 3)}" for r, ms in sorted(by_rank.items()))
        raise CheckpointError(f"LoRA rank differs between modules ({detail}); CODI uses one rank")
    for module, p in lora.items():
        a, b, w = p["lora_A"], p["lora_B"], merged[f"{module}.weight"]
        out_in = tuple(w.shape[::-1]) if arch.conv1d else tuple(w.shape)
        if a.ndim != 2 or b.ndim != 2 or w.ndim != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != out_in:
            layout = "Conv1D [in, out]" if arch.conv1d else "Linear [out, in]"
            raise CheckpointError(
                f"mis-shaped LoRA for {module}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, base weight {tuple(w.shape)} ({layout}); expected lora_A (r, {out_in[1]}) and lora_B ({out_in[0]}, r)"
            )
        delta = b.double() @ a.double()  # [out, in]
        if arch.conv1d:
            delta = delta.T
        merged[f"{module}.weight"] = (w.double() + (lora_alpha / a.shape[0]) * delta).to(w.dtype)
    targets = sorted({m.rsplit(".", 1)[-1] for m in lora})
    return merged, {"rank": next(iter(ranks.values()), None), "targets": targets}


def expected_shapes(config: PretrainedConfig, arch: Architecture, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """Every HF parameter name and shape of `arch.hf_class` on `config` with `vocab_rows` embeddings."""
    config = type(config).from_dict({**config.to_dict(), "vocab_size": vocab_rows})
    with torch.device("meta"):
        model = arch.hf_class(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_architecture(lm: dict[str, torch.Tensor], arch: Architecture) -> None:
    """Refuse a checkpoint whose language model is another architecture than the base's.

    Recognised by the input embedding's key (before LoRA keys are merged), so a LLaMA checkpoint on
    a GPT-2 base, or the reverse, gets one line instead of a list of every key.
    """
    from interp.loading.architectures import ARCHITECTURES

    if arch.embed_key in lm:
        return
    for other in ARCHITECTURES.values():
        if other.embed_key in lm:
            raise CheckpointError(
                f"the checkpoint holds a {other.model_type} model ({other.embed_key}) but the base is {arch.model_type} (expects {arch.embed_key}): pass the base the checkpoint was trained on"
            )


def check_lm_keys(merged: dict[str, torch.Tensor], config: PretrainedConfig, arch: Architecture, *, vocab_rows: int | None = None, rows_hint: str = "") -> dict[str, torch.Tensor]:
    """Check the merged LM weights against the base config with `vocab_rows` embedding rows (default:
    CODI's base vocabulary + 3); return them with lm_head filled in. `rows_hint` explains the rows."""
    vocab = config.vocab_size
    rows_expected = vocab + 3 if vocab_rows is None else vocab_rows
    expected = expected_shapes(config, arch, rows_expected)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    merged = {k: v for k, v in merged.items() if not (arch.constant_buffers and k.endswith(arch.constant_buffers))}
    if tied:  # lm_head is the embedding: absent (safetensors) or an identical copy (torch.save)
        expected.pop("lm_head.weight", None)
        head, emb = merged.pop("lm_head.weight", None), merged.get(arch.embed_key)
        if head is not None and emb is not None and not (head.shape == emb.shape and torch.equal(head, emb)):
            raise CheckpointError(f"the base ties input and output embeddings, but the checkpoint's lm_head.weight {tuple(head.shape)} differs from {arch.embed_key} {tuple(emb.shape)}")
    missing = set(expected) - set(merged)
    unused = set(merged) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt(missing)}")
    if unused:
        problems.append(f"unused keys: {_fmt(unused)}")
    if problems:
        raise CheckpointError(
            f"the checkpoint does not match the base model's architecture ({arch.model_type}, {config.num_hidden_layers} layers, d_model {config.hidden_size}): " + "; ".join(problems)
        )
    misshaped = [f"{k} {tuple(merged[k].shape)} (expected {shape})" for k, shape in expected.items() if tuple(merged[k].shape) != shape]
    if misshaped:
        hint = ""
        rows = merged[arch.embed_key].shape[0]
        if rows != rows_expected:
            hint = f" The embedding has {rows} rows; " + (rows_hint or f"a CODI checkpoint has the base vocabulary ({vocab}) + 3 (pad, bot, eot).")
        raise CheckpointError(f"mis-shaped keys: {_fmt(misshaped, 5)}.{hint}")
    if tied:
        merged["lm_head.weight"] = merged[arch.embed_key]
    return merged


def prj_module(d_model: int, hidden: int, layer_norm: bool = True, dropout: float = 0.0) -> nn.Sequential:
    """CODI's projection: Dropout -> Linear(d, h) -> GELU -> Linear(h, d) [-> LayerNorm `ln`] (keys `1.*`, `3.*`, `ln.*`)."""
    prj = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
    if layer_norm:
        prj.add_module("ln", nn.LayerNorm(d_model))
    return prj


def build_prj(prj_state: dict[str, torch.Tensor], d_model: int) -> nn.Sequential:
    """Rebuild CODI's projection: Dropout -> Linear(d, h) -> GELU -> Linear(h, d) [-> LayerNorm `ln`].

    The hidden size h is read from the keys; the LayerNorm is present only if its keys are.
    """
    need = ["1.weight", "1.bias", "3.weight", "3.bias"]
    missing = [f"prj.{k}" for k in need if k not in prj_state]
    if missing:
        raise CheckpointError(f"missing keys: {_fmt(missing)} (the projection MLP)")
    prj = prj_module(d_model, prj_state["1.weight"].shape[0], layer_norm="ln.weight" in prj_state or "ln.bias" in prj_state)
    expected = {k: tuple(v.shape) for k, v in prj.state_dict().items()}
    unused = set(prj_state) - set(expected)
    missing = set(expected) - set(prj_state)
    if unused or missing:
        parts = ([f"unused keys: {_fmt({'prj.' + k for k in unused})}"] if unused else []) + ([f"missing keys: {_fmt({'prj.' + k for k in missing})}"] if missing else [])
        raise CheckpointError("projection keys do not match Linear-GELU-Linear[-LayerNorm]: " + "; ".join(parts))
    misshaped = [f"prj.{k} {tuple(prj_state[k].shape)} (expected {s})" for k, s in expected.items() if tuple(prj_state[k].shape) != s]
    if misshaped:
        raise CheckpointError(f"mis-shaped keys: {_fmt(misshaped, 5)} (d_model is {d_model})")
    prj.load_state_dict(prj_state, strict=True)
    return prj.eval()
