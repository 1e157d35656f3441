"""Renders docs/embedded_model.md (the model card) from codi.json and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _mark(ok) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


RUN_NOTES = [
    "- A first run of the same recipe with a constant phase-2 learning rate (1e-3) reached 98.5% dev student",
    "  accuracy after 650 phase-2 steps, then oscillated (73-92% over the next 350 steps) while the teacher LM loss",
    "  rose; it was stopped. The shipped preset decays the phase-2 learning rate (cosine to 10% over the 1,200-step",
    "  cap) and reached 99% dev at phase-2 step 550. Phase 1 is deterministic and identical in both runs.",
    "- The distillation term dominates the phase-2 loss (90-98% of it, 96% over the last 50 steps, of which about",
    "  87% is the per-step part); a negligible distillation term is the failure mode to avoid, and this is not it.",
    "- Phase 2 degrades the teacher: 100% dev accuracy after phase 1, 91.5% dev and 89.9% test at the end (teacher",
    "  and student share every weight, and the early stop watches only the student).",
    "- The direct-answer baseline gives the same digit for every test question (its answer loss never left ln 10),",
    "  as in the project's earlier trial: one forward pass of this model does not compose six operations.",
    "- `interp.load_codi('interp/embedded/model.safetensors', 'interp/embedded/base').generate(q).answer_ids`",
    "  (TransformerLens) equals `student_generate` on 20 test problems; latents agree to 2e-6.",
    "- Wall time was measured on a 2-core machine shared with other jobs; `cpu_time_s` in `codi.json` is the",
    "  process's own CPU time (single thread), a better guide to the uncontended wall time.",
]


def write_model_card(path: str | Path, meta: dict[str, Any], m: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    extra = extra if extra is not None else {"notes": RUN_NOTES}
    c = meta["config"]
    obj = meta["objective"]
    st = meta["steps"]
    t = m.get("targets_met", {})
    lens = m["logit_lens"]
    K = meta["num_latents"]
    wall_min = meta["wall_time_s"] / 60
    direct_steps = m.get("direct_baseline_steps")
    lines = [
        "# The embedded CODI model",
        "",
        "`interp/embedded/` ships a small CODI model that this project trained itself, so every analysis",
        "runs offline without Llama-3.2 weights. It is a from-scratch 4-layer Llama (750k parameters incl.",
        "`prj`) whose six continuous latent thoughts carry the intermediate values of a 6-step arithmetic",
        "chain: without them (zeroed or averaged) it answers at chance, and feeding one problem's latents",
        "into another problem's prompt makes it answer the first problem.",
        "",
        "Files: `interp/embedded/model.safetensors` (official CODI checkpoint layout, no LoRA),",
        "`interp/embedded/codi.json` (run description), `interp/embedded/base/` (`config.json`,",
        "`tokenizer.json`, `tokenizer_config.json`; no base weights), `interp/embedded/metrics.json`,",
        "`interp/embedded/train_log.jsonl` (per-step losses).",
        "",
        "## Task",
        "",
        "`interp.data.arithmetic` with 6 steps: a digit x0, then six dependent operations modulo 10",
        "(`+c`, `-c` with c in 1..9, `*c` with c in {3, 7, 9}); answers are uniform over 0..9, chance is 10%.",
        "Question `7 +5 *3 -2 *7 +4 -1`; chain of thought `2 6 4 8 2 1`; answer `1`.",
        f"Held-out sets: dev (200 problems, seed {meta['task']['dev_seed']}, early stopping), test (1,000 problems,",
        f"seed {meta['task']['test_seed']}), swap pairs (1,000, seed {meta['task']['pairs_seed']}). Training batches use",
        "seeds >= 1,000,000 and drop every problem whose question string occurs in any held-out set.",
        "",
        "## Architecture",
        "",
        f"`LlamaForCausalLM` from scratch: {c['num_layers']} layers, d_model {c['hidden_size']}, {c['num_heads']} query heads /",
        f"{c['num_kv_heads']} KV heads (head_dim {c['hidden_size'] // c['num_heads']}), SwiGLU MLP {c['intermediate_size']}, RMSNorm eps 1e-5,",
        f"rope_theta 10000, max_position_embeddings {c['max_position_embeddings']}, tied input/output embeddings.",
        "Embeddings have V + 3 = 23 rows: `pad` = 20, `bot` = 21, `eot` = 22 (`base/config.json` says",
        "`vocab_size: 20`, the base vocabulary, as for any CODI checkpoint).",
        f"`prj` = Dropout(p={c['prj_dropout']}) -> Linear(128, 128) -> GELU -> Linear(128, 128) -> LayerNorm `ln`",
        "(keys `prj.1.*`, `prj.3.*`, `prj.ln.*`). Trained without LoRA, so the checkpoint holds",
        "`codi.model.*` (every Llama weight except the tied `lm_head`) and `prj.*`; `codi.json` has `lora_alpha: null`.",
        "",
        "## Tokenizer",
        "",
        "Word level (`tokenizers`), 20 tokens in this id order: `<s> </s> <unk> 0 1 2 3 4 5 6 7 8 9 + - * : The answer is`.",
        "The pre-tokenizer splits on whitespace and isolates every digit and punctuation character",
        "(`7 +5 *3` -> `7 + 5 * 3`; `The answer is: 4` -> `The answer is : 4`); a template post-processor",
        "prepends `<s>` (as Llama's does); the decoder joins tokens with spaces, so the student's output",
        "text is `The answer is : N` and the official last-number rule reads N.",
        "",
        "## Sequences and objective",
        "",
        "- teacher: `<s> question <bot> v1 v2 v3 v4 v5 v6 <eot> The answer is : N </s>`, LM loss after `<bot>`;",
        "- student: `<s> question <bot> [L1 .. L6] <eot> The answer is : N </s>`, L1 = prj(final-normed state at",
        "  `<bot>`), L(t+1) = prj(final-normed state at L(t)) (HF `hidden_states[-1]`, after the final RMSNorm),",
        "  fed with a KV cache; LM loss after `<eot>`; gradients flow through the whole latent chain.",
        "  Teacher and student are one network (shared weights), as in CODI.",
        f"- distillation (alpha = {obj.get('alpha')}): CODI's term at the `:` token before the answer number, over all",
        "  hidden states (embedding output and every layer), smooth L1, teacher detached, each layer's term divided by",
        "  the std of the selected teacher states, averaged over layers (the reference code's definition).",
    ]
    if obj.get("step_distill"):
        lines += [
            f"- **plus a per-step alignment term (weight {obj.get('step_distill_weight')}) that is NOT the published CODI",
            "  objective**: the same distillation term at every latent position t toward the teacher's hidden states",
            "  at the position of v_t (same absolute position in both sequences), and at `<eot>`, averaged over the 7",
            "  positions. It nearly supervises each latent directly (the embedding-layer part pulls L_t toward the",
            "  embedding of v_t), which is why the latents here are so legible. Plain CODI (only the `:` term) left the",
            "  student at chance (9.8%) on this task in an earlier trial of the same model size. Treat results",
            "  on this model as results on a CODI-architecture model with stepwise-aligned latents, not on a model",
            "  trained with CODI's published loss.",
        ]
    lines += [
        "",
        "## Training",
        "",
        "```",
        "interp train --preset embedded --out DIR   # = interp.train.cli_train('embedded', DIR, 0) / train_preset('embedded', DIR)",
        "```",
        "",
        f"- Phase 1, teacher alone (LM loss), AdamW lr {c['p1_lr']}, batch {c['p1_batch']}, until the dev teacher decodes",
        f"  chain and answer exactly on all 200 dev problems: **{st['phase1']} steps**.",
        f"- Phase 2, CODI from the phase-1 weights (fresh `prj`), AdamW lr {c['p2_lr']}, batch {c['p2_batch']}, dev student",
        f"  accuracy checked every {c['eval_every']} steps, stop at >= {c['p2_target']:.0%} (cap {c['p2_max_steps']}): **{st['phase2']} steps**.",
        f"- Both phases: betas (0.9, 0.98), weight decay {c['weight_decay']}, {c['warmup_steps']}-step linear warmup, grad-norm clip",
        f"  {c['grad_clip']}, seed {meta['seed']} (torch + python `random`), `torch.set_num_threads(1)`.",
        f"- Wall time: **{wall_min:.1f} min** single-threaded ({st['total']} optimizer steps; phase 1 took",
        f"  {meta['dev'].get('phase1_wall_s', 0) / 60:.1f} min) on a shared 2-core AMD EPYC CPU; process CPU time",
        f"  {meta.get('cpu_time_s', 0) / 60:.1f} min.",
        f"- Dev at the end: student {_pct(meta['dev'].get('student_dev_acc'))}, teacher {_pct(meta['dev'].get('teacher_dev_acc'))}.",
        "- Direct-answer baseline (`interp train --preset direct-baseline`): same size, `<s> question The answer is : N </s>`,",
        f"  no chain and no latents, AdamW lr {c['direct_lr']}, batch {c['direct_batch']}, "
        f"{direct_steps if direct_steps is not None else 'n/a'} steps (= phases 1 + 2 of the embedded run). It is not shipped",
        "  (about 3 MB, retrained in about 15-25 min).",
        "",
        "## Measured on 1,000 held-out problems",
        "",
        "`python -m interp.train.evaluate --model interp/embedded --direct DIRECT_DIR --card docs/embedded_model.md`;",
        "inference is `interp.train.evaluate.student_generate`, the official loop (question + `bot`, six latents fed",
        "with a KV cache, `eot`, greedy decoding over logits[..., :eot] until `</s>` or 16 tokens, last number).",
        "",
        "| measurement | value | target |",
        "|---|---|---|",
        f"| student accuracy | {_pct(m['student_accuracy'])} | >= 90% ({_mark(t.get('student >= 0.90'))}) |",
        f"| latents replaced by zeros | {_pct(m['zeroed_latents_accuracy'])} | <= 30% ({_mark(t.get('zeroed latents <= 0.30'))}) |",
        f"| latents replaced by the mean latent (per position, over the test set) | {_pct(m['mean_latents_accuracy'])} | <= 30% ({_mark(t.get('mean latents <= 0.30'))}) |",
        f"| teacher decoding its written chain (answer) | {_pct(m['teacher_accuracy'])} | |",
        f"| teacher: written chain exactly right | {_pct(m['teacher_chain_exact'])} | |",
        f"| direct-answer baseline | {_pct(m.get('direct_baseline_accuracy'))} | <= student - 20 points ({_mark(t.get('direct baseline <= student - 0.20'))}) |",
        f"| latent swap: clean latents into the corrupted prompt -> clean answer | {_pct(m['swap']['clean_answer_rate'])} | >= 80% ({_mark(t.get('swap clean-answer rate >= 0.80'))}) |",
        f"| latent swap -> corrupted answer | {_pct(m['swap']['corrupted_answer_rate'])} | |",
        f"| student on the pairs' clean / corrupted questions | {_pct(m['swap']['student_clean_accuracy'])} / {_pct(m['swap']['student_corrupted_accuracy'])} | |",
        "",
        f"Logit lens (top token of the tied unembedding over all 23 rows), per latent t = 1..{K}:",
        "",
        "| latent t | " + " | ".join(str(i + 1) for i in range(K)) + " |",
        "|---|" + "---|" * K,
        "| final-normed state at latent t == v_t | " + " | ".join(_pct(x) for x in lens["final_state_eq_v_t"]) + " |",
        "| final-normed state at latent t == v_(t+1) | " + " | ".join(_pct(x) for x in lens["final_state_eq_v_t+1"]) + " |",
        "| fed embedding L_t == v_t | " + " | ".join(_pct(x) for x in lens["embedding_eq_v_t"]) + " |",
        "| fed embedding L_t == v_(t+1) | " + " | ".join(_pct(x) for x in lens["embedding_eq_v_t+1"]) + " |",
        "",
        f"(v_{K + 1} does not exist; at latent {K} the final state's top tokens are {lens.get('final_state_top_tokens_last_latent')}.)",
        "",
    ]
    if extra.get("notes"):
        lines += ["## Notes", ""] + list(extra["notes"]) + [""]
    lines += [
        "## Limitations",
        "",
        "- One seed, one task, one chain length (6). Problems of other lengths were never seen.",
        "- The per-step alignment term (above) makes the latents nearly supervised; do not read this model's",
        "  legibility as evidence about CODI models trained with the published objective.",
        "- The latents are not token embeddings: their mean norm is about 7.1, digit embeddings about 1.2. Their",
        "  direction is token-like (the unembedding's top token is v_t in about 80% of cases, table above).",
        "",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":  # re-render from the shipped files
    import sys

    root = Path(__file__).resolve().parents[1] / "embedded"
    write_model_card(sys.argv[1] if len(sys.argv) > 1 else "docs/embedded_model.md", json.loads((root / "codi.json").read_text()), json.loads((root / "metrics.json").read_text()))
