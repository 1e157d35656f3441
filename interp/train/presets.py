"""Named training presets and the `interp train` entry point."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from interp.train.trainer import TrainConfig, TrainResult, train

PRESETS: dict[str, TrainConfig] = {
    # The shipped model (interp/embedded/): phase 1 teacher, then CODI + per-step alignment.
    "embedded": TrainConfig(name="embedded", p2_max_steps=1200),
    # Same size and optimiser as the embedded model's phase 1, no chain, no latents; its step count
    # matches the embedded run's phase 1 + phase 2 (see docs/embedded_model.md).
    "direct-baseline": TrainConfig(name="direct-baseline", objective="direct", direct_steps=1100),
    # The published CODI objective (issue #21): phase 1 as "embedded", then phase 2 with teacher CE + student CE +
    # alpha * distillation of every layer's hidden state at the token before the answer, WITHOUT the per-step term.
    # Not trained in this repository yet (CPU budget); `interp train --preset codi --out DIR` trains it.
    "codi": TrainConfig(name="codi", p2_max_steps=1200, step_distill=False),
    # The published objective with a curriculum over chain length (issue #21): phase 1 as "embedded", then phase 2
    # on 2-step chains, then 3, ..., 6 (6 latents throughout; each stage up to 250 steps or 99% dev accuracy).
    "codi-curriculum": TrainConfig(name="codi-curriculum", p2_max_steps=250, step_distill=False, p2_curriculum=(2, 3, 4, 5, 6)),
    # Liang & Pan 2026's from-scratch CODI settings where this trainer has them (3 layers, 2 heads, d 128, no LoRA,
    # lr 3e-4 cosine with 3% warm-up, weight decay 0.1, batch 256) on their chain length (3 steps); Llama-shaped, not
    # GPT-2, and prj hidden = d (128, not 256). Its control: "direct-3step".
    "codi-3step": TrainConfig(
        name="codi-3step",
        task_steps=3,
        num_layers=3,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=512,
        weight_decay=0.1,
        warmup_steps=36,
        p2_batch=256,
        p2_lr=3e-4,
        p2_max_steps=1200,
        p2_min_lr_frac=0.0,
        step_distill=False,
    ),
    # A 2-layer d=32 model, a few dozen steps: for tests (< 30 s).
    "micro": TrainConfig(
        name="micro",
        task_steps=3,
        num_latents=3,
        num_layers=2,
        hidden_size=32,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        max_position_embeddings=32,
        p1_batch=32,
        p1_lr=1e-2,
        p1_max_steps=25,
        p2_batch=16,
        p2_lr=3e-3,
        p2_max_steps=15,
        direct_batch=32,
        direct_lr=1e-2,
        direct_steps=25,
        warmup_steps=2,
        eval_every=1000,
        dev_size=32,
        progress=False,
        save_phase1=False,
    ),
}


PRESETS["codi-3step-long"] = dataclasses.replace(PRESETS["codi-3step"], name="codi-3step-long", p2_max_steps=2400)  # twice the schedule
PRESETS["direct-3step"] = dataclasses.replace(PRESETS["codi-3step"], name="direct-3step", objective="direct", direct_steps=2000)  # >= the codi run's steps
PRESETS["micro-codi"] = dataclasses.replace(PRESETS["micro"], name="micro-codi", step_distill=False)  # the published CODI objective, for tests
PRESETS["micro-codi-curriculum"] = dataclasses.replace(PRESETS["micro-codi"], name="micro-codi-curriculum", p2_max_steps=6, p2_curriculum=(2, 3))


def get_preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def train_preset(name: str, out_dir: str | Path, seed: int = 0, resume: bool = False, **overrides) -> TrainResult:
    """Train preset `name` (overriding any `TrainConfig` field) and write its checkpoint to `out_dir`."""
    return train(get_preset(name, **overrides), out_dir, seed=seed, resume=resume)


def cli_train(preset: str, out: str | Path, seed: int = 0, resume: bool = False) -> int:
    """`interp train --preset NAME --out DIR [--seed S] [--resume]`: train, write the checkpoint, print a summary."""
    res = train_preset(preset, out, seed=seed, resume=resume)
    m = res.meta
    print(f"wrote {Path(out) / 'model.safetensors'} ({m['objective']['name']}, steps {m['steps']}, {m['wall_time_s']} s, dev {m['dev']})")
    return 0
