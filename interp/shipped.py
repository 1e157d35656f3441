"""The models that ship inside the package, one record each: where they live, what their card says,
and whether they may serve as a default.

A shipped model is a default (`interp.load_default(name)`) only where its training left the question
open enough to study and the thoughts demonstrably carry the answer: accuracy at least
`MARGIN` above every control of the same size and steps, and swapping all thoughts of problem A
into problem B gives A's answer in at least `SWAP_A` of the pairs whose A the model answers right.
Every shipped model loads with `load_shipped(name)`, for studies of the models that fail that test.
`forced` marks a model whose loss forced its chain (the per-step alignment term): what a study finds
on it is a check of the tools, not a property of CODI or Coconut training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EMBEDDED = Path(__file__).resolve().parent / "embedded"
MARGIN = 0.30  # accuracy above every control
SWAP_A = 0.80  # swapped thoughts give A's answer


@dataclass(frozen=True)
class ShippedModel:
    """One shipped model.

    directory: its checkpoint directory under interp/embedded/ (with `base/` and `metrics.json`);
    checkpoint: the file or `checkpoint_N` inside it; results: the headline study's run directory and
    the analysis directory under results/ (repository-relative); task_steps: its arithmetic chain length.
    """

    name: str
    family: str  # "codi" or "coconut"
    directory: Path
    checkpoint: str
    num_latents: int
    card: str
    forced: bool
    objective: str
    results: tuple[str, str]
    task_steps: int = 6  # the arithmetic chain length it was trained on (`interp.data.arithmetic`)

    def metrics(self) -> dict[str, Any]:
        """The card's measured numbers (`metrics.json`), in one shape for both families:
        accuracy, controls {name: accuracy}, zeroed / mean thoughts accuracy, swap_gives_A (of pairs
        whose A is answered right), n_test."""
        m = json.loads((self.directory / "metrics.json").read_text())
        if self.family == "codi":
            controls = {"direct": m["direct_baseline_accuracy"]}
            return {
                "accuracy": m["student_accuracy"],
                "controls": controls,
                "zeroed": m["zeroed_latents_accuracy"],
                "mean": m["mean_latents_accuracy"],
                "swap_gives_A": m["swap"]["clean_answer_rate"],
                "n_test": m["n_test"],
            }
        controls = {k: m[k]["accuracy"] for k in ("pause", "direct") if k in m}
        parent = self.directory.parent / "metrics.json"
        if not controls and parent.is_file():  # a stage checkpoint of a run: the run's controls at that stage
            p = json.loads(parent.read_text())
            controls = {"pause": p["pause_end_of_stage3"]["accuracy_by_num_pauses"][str(self.num_latents)], "direct": p["direct"]["accuracy"]}
        return {
            "accuracy": m["accuracy"],
            "controls": controls,
            "zeroed": m["accuracy_zero_thoughts"],
            "mean": m["accuracy_mean_thoughts"],
            "swap_gives_A": m["swap_minimal_pairs"]["gives_A_answer"],
            "n_test": m["n_test"],
        }

    def qualification(self) -> tuple[bool, str]:
        """(may serve as a default, why): the two tests of the module docstring."""
        m = self.metrics()
        if not m["controls"]:
            return False, "no control measured"
        best = max(m["controls"].items(), key=lambda kv: kv[1])
        margin = m["accuracy"] - best[1]
        why = f"accuracy {m['accuracy']:.1%} vs {best[0]} control {best[1]:.1%} ({margin:+.1%}); swapped thoughts give A's answer in {m['swap_gives_A']:.1%}"
        return margin >= MARGIN and m["swap_gives_A"] >= SWAP_A, why

    def load(self, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
        from interp.loading import load_coconut, load_codi

        device = device or "cpu"
        if self.family == "codi":
            meta = json.loads((self.directory / "codi.json").read_text())
            return load_codi(self.directory / self.checkpoint, self.directory / "base", num_latents=self.num_latents, answer_prefix=meta["answer_prefix"], dtype=dtype, device=device)
        return load_coconut(self.directory / self.checkpoint, self.directory / "base", num_latents=self.num_latents, dtype=dtype, device=device)


def _registry() -> dict[str, ShippedModel]:
    models = [
        ShippedModel(
            "aligned",
            "codi",
            EMBEDDED,
            "model.safetensors",
            6,
            "docs/embedded_model.md",
            True,
            "CODI + a per-step alignment term (not the published objective)",
            ("results/embedded_grid", "results/embedded_analysis"),
        ),
        ShippedModel(
            "coconut",
            "coconut",
            EMBEDDED / "coconut",
            "checkpoint_7100",
            6,
            "docs/coconut_model.md",
            False,
            "Coconut curriculum, all 6 steps latent",
            ("results/coconut_grid", "results/coconut_analysis"),
        ),
        ShippedModel(
            "coconut-stage3",
            "coconut",
            EMBEDDED / "coconut" / "stage3",
            "checkpoint_2900",
            3,
            "docs/coconut_model.md",
            False,
            "Coconut curriculum, stage 3 (3 thoughts, then 3 written steps)",
            ("results/coconut_stage3_grid", "results/coconut_stage3_analysis"),
        ),
    ]
    codi = EMBEDDED / "codi"
    if (codi / "metrics.json").exists():
        steps = json.loads((codi / "codi.json").read_text())["task"]["steps"]
        models.append(ShippedModel("codi", "codi", codi, "model.safetensors", 6, "docs/codi_model.md", False, "the published CODI objective", ("results/codi_grid", "results/codi_analysis"), steps))
    return {m.name: m for m in models}


SHIPPED: dict[str, ShippedModel] = _registry()


def shipped(name: str) -> ShippedModel:
    if name not in SHIPPED:
        raise ValueError(f"no shipped model {name!r}; shipped: {', '.join(SHIPPED)}")
    return SHIPPED[name]


def load_shipped(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """Any shipped model by name (also those that may not serve as a default), e.g. `load_shipped("coconut-stage3")`."""
    return shipped(name).load(dtype=dtype, device=device)


def defaults() -> list[str]:
    """The shipped models that may serve as a default, most faithful first (an unforced one before a forced one)."""
    ok = [m for m in SHIPPED.values() if m.qualification()[0]]
    return [m.name for m in sorted(ok, key=lambda m: m.forced)]
