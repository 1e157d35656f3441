"""Renders the measured tables of docs/coconut_model.md from coconut.json, metrics.json and the train logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from interp.train.coconut import stage_curve


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def stage_table(meta: dict[str, Any]) -> list[str]:
    c = meta["config"]
    lines = ["| stage | thoughts | written steps | steps trained (budget) | dev answer acc at the end | uniform_prob | lr | CPU min at the end |", "|---|---|---|---|---|---|---|---|"]
    for s in meta["stages"]:
        k = s["stage"]
        lines.append(
            f"| {k} | {s['dev_latents']} | {c['task_steps'] - min(k, c['task_steps'])} | {s['steps']} ({c['stage_max_steps'][k]}) | {_pct(s['dev_acc'])} | "
            f"{c['uniform_prob'][k]} | {c['lr_stage0'] if k == 0 else c['lr']} | {s['cpu_s'] / 60:.1f} |"
        )
    return lines


def curve_table(log_path: str | Path, every: int = 100) -> list[str]:
    """Dev accuracy per stage over its steps (every `every` steps and each stage's last evaluation)."""
    curve = stage_curve(log_path)
    by: dict[int, list[dict[str, Any]]] = {}
    for r in curve:
        by.setdefault(r["stage"], []).append(r)
    lines = ["| stage | dev answer accuracy at step (within the stage) |", "|---|---|"]
    for k, rs in sorted(by.items()):
        pts = [r for r in rs if r["step"] % every == 0 or r is rs[-1]]
        lines.append(f"| {k} | " + ", ".join(f"{r['step']}: {100 * r['dev_acc']:.0f}%" for r in pts) + " |")
    return lines


def metrics_table(m: dict[str, Any]) -> list[str]:
    sr, sm = m["swap_random_pairs"], m["swap_minimal_pairs"]
    rows = [
        ("Coconut, 6 thoughts (the model)", _pct(m["accuracy"])),
        ("... every thought replaced by zeros", _pct(m["accuracy_zero_thoughts"])),
        ("... every thought replaced by its mean over the test set (per position)", _pct(m["accuracy_mean_thoughts"])),
        *[(f"... run with {k} thoughts", _pct(v)) for k, v in m["accuracy_by_num_thoughts"].items() if int(k) != m["num_latents"]],
    ]
    if "pause" in m:
        p = m["pause"]
        where = f"{p['total_steps']} steps, last stage trained {p['last_stage_trained']}" + (", stopped inside it" if p.get("stopped") else "")
        for k, v in p["accuracy_by_num_pauses"].items():
            rows.append((f"pause control ({where}), {k} pause tokens", _pct(v)))
    if "direct" in m:
        d = m["direct"]
        rows.append((f"direct (no-CoT) control ({d['total_steps']} steps; {d['distinct_answers']} distinct answer(s) over the test set)", _pct(d["accuracy"])))
    rows += [
        (f"swap, random pairs: A's 6 thoughts in B's prompt -> A's answer ({sr['pairs_A_right']} pairs whose A is right)", _pct(sr["gives_A_answer"])),
        (
            f"... of those with different answers ({sr['pairs_A_right_answers_differ']}): A's answer / B's answer",
            f"{_pct(sr['gives_A_answer_when_answers_differ'])} / {_pct(sr['gives_B_answer_when_answers_differ'])}",
        ),
        (f"swap, minimal pairs (clean -> corrupted, one number changed; {sm['pairs_A_right']} pairs whose clean is right)", _pct(sm["gives_A_answer"])),
        ("... clean answer / corrupted answer (answers always differ)", f"{_pct(sm['gives_A_answer_when_answers_differ'])} / {_pct(sm['gives_B_answer_when_answers_differ'])}"),
    ]
    lines = ["| measurement (1,000 test problems, seed 900002; pairs seed 900003) | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return lines


def readout_table(m: dict[str, Any]) -> list[str]:
    r = m["readout"]
    K = m["num_latents"]
    lines = ["| thought t (fed at latent t) | " + " | ".join(str(t + 1) for t in range(K)) + " |", "|---" * (K + 1) + "|"]
    lines.append("| top digit of its unembedding == v_t | " + " | ".join(_pct(x) for x in r["top_digit_eq_v_t"]) + " |")
    lines.append("| top digit == v_(t+1) | " + " | ".join(_pct(x) for x in r["top_digit_eq_v_t+1"]) + " |")
    lines.append("| top tokens (all rows) | " + " | ".join(", ".join(f"`{k!s}`".replace("\n", "\\n") + f" {v}" for k, v in c.items()) for c in r["top_token_counts"]) + " |")
    return lines


def render(model_dir: str | Path) -> str:
    d = Path(model_dir)
    meta = json.loads((d / "coconut.json").read_text())
    m = json.loads((d / "metrics.json").read_text())
    out = ["### Stages", "", *stage_table(meta), "", "### Dev accuracy during each stage", "", *curve_table(d / "train_log.jsonl"), ""]
    out += ["### Measured", "", *metrics_table(m), "", "### What each thought reads as", "", *readout_table(m), ""]
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    print(render(sys.argv[1]))
