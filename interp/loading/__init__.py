"""Load a CODI or Coconut checkpoint exactly into a `LatentModel` wrapping a `HookedTransformer`.

`load_codi(checkpoint, base)` and `load_coconut(checkpoint, base)` take local paths or Hugging Face
hub ids (`hub`), read the base's config and tokenizer, pick the architecture's entry in one table
(`architectures`), check every checkpoint key (`checkpoint`: CODI's, merging LoRA; `coconut`:
Coconut's, adding its markers), and convert the HF weights with TransformerLens's own conversion
for that architecture, without folding or centering anything, so every hook point sees what the
original network computes (thoughts read the final-normed state, LayerNorm weight and bias
included). `load_model` reads the checkpoint once and picks the family from its keys. No forward
passes happen here.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from interp.family import COCONUT, CODI
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
    checkpoint_file,
    merge_lora,
    read_state_dict,
    split_state_dict,
)
from interp.loading.coconut import MARKERS, family_of, split_coconut_state, with_markers
from interp.loading.hub import (
    OFFICIAL_BASES,
    Resolved,
    default_base,
    is_hub_id,
    resolve_base,
    resolve_checkpoint,
)
from interp.model import LatentModel

__all__ = [
    "ARCHITECTURES",
    "CHECKPOINT_FILES",
    "OFFICIAL_BASES",
    "Architecture",
    "Checkpoint",
    "CheckpointError",
    "architecture",
    "hooked_config",
    "load_base",
    "load_coconut",
    "load_codi",
    "load_default",
    "load_model",
    "read_checkpoint",
    "read_state_dict",
    "rope_parameters",
]


def load_base(base: Any, revision: str | None = None) -> tuple[PretrainedConfig, Any, Resolved | None]:
    """The base model's config and tokenizer: a local directory, a hub id, or (model, tokenizer).

    Only the config and tokenizer are read: the checkpoint holds every weight of the network
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
    checkpoint: str | Path | dict[str, torch.Tensor] | Checkpoint,
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
) -> LatentModel:
    """Load a CODI checkpoint exactly into a `LatentModel` wrapping a `HookedTransformer`.

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
    repo_id = str(checkpoint) if isinstance(checkpoint, str | Path) and is_hub_id(str(checkpoint)) else checkpoint.found.repo_id if isinstance(checkpoint, Checkpoint) and checkpoint.found else None
    if base is None and repo_id is None:
        raise CheckpointError(
            f"base= is required for a local checkpoint: pass the local directory or hub id of the model it was trained on (defaults exist only for the official hub ids {', '.join(OFFICIAL_BASES)})"
        )
    base = default_base(repo_id) if base is None else base  # before reading: an unknown id fails here, not on a download
    ckpt = read_checkpoint(checkpoint, revision)
    state, found = ckpt.state, ckpt.found
    if family_of(state) != "codi":
        raise CheckpointError(f"{ckpt.where} is a Coconut checkpoint (base_causallm.* keys): load it with interp.load_coconut or interp.load_model")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config, tokenizer, base_found = load_base(base, base_revision)
    _check_base_revision(base_found, base_revision)
    arch = architecture(config)
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
        **_provenance(found, base_found),
        "family": "codi",
        "model_type": arch.model_type,
        "lora_alpha": float(lora_alpha),
        "lora_rank": lora["rank"],
        "num_latents": num_latents,
        "remove_eos": remove_eos,
        "answer_prefix": answer_prefix,
        "dtype": str(dtype).removeprefix("torch."),
        "n_ctx": cfg.n_ctx,
    }
    return LatentModel(
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
        family=CODI,
    )


def load_coconut(
    checkpoint: str | Path | dict[str, torch.Tensor] | Checkpoint,
    base: Any,
    *,
    num_latents: int = 6,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    n_ctx: int | None = None,
    revision: str | None = None,
    base_revision: str | None = None,
) -> LatentModel:
    """Load a Coconut checkpoint (Hao et al. 2024, the official training's format) into a `LatentModel`.

    Args:
        checkpoint: the raw `torch.save(state_dict)` file `checkpoint_N` the official `run.py` writes,
            a directory holding one or several (the highest N is read; `load_options["checkpoint"]`
            names the file), a hub id whose repo holds them, or a state_dict: keys `base_causallm.*`
            and `embedding.weight`, every one accounted for.
        base: the base model it was trained from (required: no official checkpoints exist): a hub id
            (`openai-community/gpt2`, `meta-llama/Llama-3.2-1B`), a local HF directory (config +
            tokenizer) or a (transformers model, tokenizer) tuple. Its tokenizer gets the markers
            `<|start-latent|>`, `<|end-latent|>`, `<|latent|>` in the official order.
        num_latents: the number of thoughts (not stored in checkpoints; the official configs run 6:
            GSM `c_thought 2 x max_latent_stage 3`, ProsQA `1 x 6`); 0 runs no thought at all.
            `generate(..., num_latents=k)` changes it per call.
        n_ctx, dtype, device, revision, base_revision: as for `load_codi`.

    The thought fed at a latent position is the final-normed last-layer state at the position
    before it (hook `hook_thought`); the answer follows `###`; decoding runs over the whole vocabulary.
    """
    ckpt = read_checkpoint(checkpoint, revision)
    state, found = ckpt.state, ckpt.found
    if family_of(state) != "coconut":
        raise CheckpointError(f"{ckpt.where} is a CODI checkpoint (codi.* and prj.* keys): load it with interp.load_codi or interp.load_model")
    if base is None:
        raise CheckpointError(
            "base= is required for a Coconut checkpoint (no official Coconut checkpoints were released): pass the hub id or local "
            "directory of the model it was trained from, e.g. openai-community/gpt2 or meta-llama/Llama-3.2-1B"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config, tokenizer, base_found = load_base(base, base_revision)
    _check_base_revision(base_found, base_revision)
    arch = architecture(config)
    tokenizer, ids = with_markers(tokenizer)
    lm = split_coconut_state(state, arch)
    check_architecture(lm, arch)
    rows = len(tokenizer)
    hint = f"the base tokenizer with Coconut's three markers has {rows} tokens, and the official code resizes the embedding to that. Is the base the one the checkpoint was trained from?"
    weights = check_lm_keys(lm, config, arch, vocab_rows=rows, rows_hint=hint)
    cfg = arch.hooked_config(config, dtype=dtype, device=device, n_ctx=n_ctx, vocab_rows=rows)
    model = to_hooked_transformer(weights, config, arch, cfg)
    start, end, latent = (ids[m] for m in MARKERS)
    options = {
        **_provenance(found, base_found),
        "family": "coconut",
        "model_type": arch.model_type,
        "num_latents": num_latents,
        "markers": {"start_latent": start, "end_latent": end, "latent": latent},
        "dtype": str(dtype).removeprefix("torch."),
        "n_ctx": cfg.n_ctx,
    }
    return LatentModel(
        model=model,
        tokenizer=tokenizer,
        prj=None,
        pad_id=int(tokenizer.eos_token_id),
        bot_id=start,
        eot_id=end,
        num_latents=num_latents,
        answer_prefix=COCONUT.answer_prefix,
        load_options=options,
        family=COCONUT,
    )


#: options only CODI checkpoints take
CODI_ONLY = ("lora_alpha", "remove_eos", "answer_prefix")


def load_model(checkpoint: str | Path | dict[str, torch.Tensor], base: Any = None, **options: Any) -> LatentModel:
    """Load a CODI or a Coconut checkpoint, whichever its keys say it is (CODI: `codi.*` + `prj.*`;
    Coconut: `base_causallm.*`), reading it once; `options` are `load_codi`'s or `load_coconut`'s.

    A plain causal LM (a CoT / no-CoT checkpoint of the Coconut code, a base model) is refused with
    a one-line error, and so are CODI-only options (`lora_alpha`, `remove_eos`, `answer_prefix`) for Coconut.
    """
    if base is None and (isinstance(checkpoint, dict) or not is_hub_id(str(checkpoint))):
        raise CheckpointError("base= is required for a local checkpoint: pass the local directory or hub id of the model it was trained on (CODI or Coconut)")
    ckpt = read_checkpoint(checkpoint, options.pop("revision", None))
    if family_of(ckpt.state) == "codi":
        return load_codi(ckpt, base, **options)
    wrong = [k for k in CODI_ONLY if k in options]
    if wrong:
        raise CheckpointError(f"{ckpt.where} is a Coconut checkpoint; {', '.join(wrong)} apply to CODI checkpoints only")
    return load_coconut(ckpt, base, **options)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read once: its state_dict and where it was read (None for a state_dict given as such;
    the path is the file actually read). The loaders take one in place of a path."""

    state: dict[str, torch.Tensor]
    found: Resolved | None

    @property
    def where(self) -> str:
        return "the state_dict" if self.found is None else f"checkpoint {self.found.ref}"


def read_checkpoint(checkpoint: str | Path | dict[str, torch.Tensor] | Checkpoint, revision: str | None = None) -> Checkpoint:
    """The state_dict a checkpoint names (a hub id, a directory, a file, a state_dict or an already
    read `Checkpoint`), with finite values, and where it was read."""
    if isinstance(checkpoint, Checkpoint | dict) and revision is not None:
        raise CheckpointError("revision= and base_revision= apply to hub ids only; a local path is read as it is")
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    if isinstance(checkpoint, dict):
        check_finite(checkpoint)
        return Checkpoint(checkpoint, None)
    found = resolve_checkpoint(checkpoint, revision)
    if revision is not None and found.repo_id is None:
        raise CheckpointError("revision= and base_revision= apply to hub ids only; a local path is read as it is")
    found = dataclasses.replace(found, path=checkpoint_file(found.path))
    state = read_state_dict(found.path)
    check_finite(state)
    return Checkpoint(state, found)


def _check_base_revision(base_found: Resolved | None, base_revision: str | None) -> None:
    if base_revision is not None and (base_found is None or base_found.repo_id is None):
        raise CheckpointError("revision= and base_revision= apply to hub ids only; a local path is read as it is")


def _provenance(found: Resolved | None, base_found: Resolved | None) -> dict[str, Any]:
    return {
        "checkpoint": found.provenance() if found is not None else "state_dict",
        "base": base_found.provenance() if base_found is not None else "(model, tokenizer)",
    }


EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "embedded"


def load_default(name: str | None = None, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> LatentModel:
    """A shipped model that may serve as a default (`interp.shipped`): `name`, or the most faithful one.

    A default's accuracy stands at least 30 points above its controls and its thoughts carry the
    answer (a swap gives the donor's answer in >= 80% of pairs). Today that is only "aligned", the
    CODI trained with a per-step alignment term that forced its chain (docs/embedded_model.md); the
    other shipped models load with `interp.load_shipped(name)`.
    """
    from interp.shipped import SHIPPED, defaults

    if name is None:
        name = defaults()[0]
    if name not in SHIPPED:
        raise ValueError(f"no shipped model {name!r}; shipped: {', '.join(SHIPPED)}")
    ok, why = SHIPPED[name].qualification()
    if not ok:
        raise ValueError(
            f"the shipped model {name!r} may not serve as a default ({why}; a default needs +30 points over its controls and >= 80%); load it for study with interp.load_shipped({name!r})"
        )
    return SHIPPED[name].load(dtype=dtype, device=device)
