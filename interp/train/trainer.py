"""Training: phase 1 (teacher on the written chain), phase 2 (CODI), and the direct-answer baseline.

Teacher and student are one network (as in CODI). Phase 2's loss is

    teacher LM (tokens after <bot>) + student LM (tokens after <eot>) + alpha * distill

where `distill` is CODI's distillation at the token before the answer number (the ":"), over
all hidden states (embeddings + every layer), smooth L1, teacher detached, each layer's term
divided by the std of the selected teacher states and averaged over layers (as the reference
code does), PLUS, when `step_distill` is on, the same term at every latent position t toward
the teacher's states at the position of v_t, and at <eot> (averaged over those K + 1 positions,
weighted by `step_distill_weight`). That per-step term is NOT part of the published CODI
objective: it nearly supervises each latent directly (see docs/embedded_model.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from interp.train import data as D
from interp.train.modeling import build_llama, build_prj, cache_kwargs, checkpoint_state_dict, restrict_logits, run_latents, save_checkpoint
from interp.train.tokenizer import ANSWER_PREFIX, VOCAB, llama_config


@dataclass
class TrainConfig:
    name: str = "custom"
    objective: str = "codi"  # "codi" (phase 1 + phase 2) or "direct"
    task_steps: int = 6
    num_latents: int = 6
    # model
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 336
    max_position_embeddings: int = 64
    prj_dropout: float = 0.0
    # optimisation (AdamW, linear warmup then constant)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 20
    # phase 1: teacher alone
    p1_batch: int = 256
    p1_lr: float = 2e-3
    p1_max_steps: int = 1500
    p1_target: float = 1.0  # dev teacher accuracy (written chain + answer all right) to stop at
    # phase 2: CODI
    p2_batch: int = 128
    p2_lr: float = 1e-3
    p2_max_steps: int = 2000
    p2_target: float = 0.99  # dev student accuracy to stop at
    p2_schedule: str = "cosine"  # "constant" or "cosine" (decays to p2_min_lr_frac * lr at p2_max_steps)
    p2_min_lr_frac: float = 0.1
    alpha: float = 20.0
    # chain lengths of successive phase-2 stages (a curriculum over chain length; each stage up to
    # p2_max_steps, stopping at p2_target on a dev set of its length, optimiser reset per stage);
    # empty: one stage at task_steps
    p2_curriculum: tuple[int, ...] = ()
    step_distill: bool = True
    step_distill_weight: float = 1.0
    # direct baseline
    direct_batch: int = 256
    direct_lr: float = 2e-3
    direct_steps: int = 1500
    # evaluation during training
    eval_every: int = 50
    dev_size: int = D.DEV_SIZE
    num_threads: int | None = 1
    save_phase1: bool = True  # also write the phase-1 teacher to <out>/phase1/ (same format, no prj)
    resume_phase1: str | None = None  # a <out>/phase1 dir of the SAME config + seed: skip phase 1 (identical result)
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def base_config(self):
        return llama_config(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
        )


@dataclass
class TrainResult:
    out_dir: Path
    meta: dict[str, Any]
    log: list[dict[str, Any]]
    llama: Any = None
    prj: Any = None


# ---------------------------------------------------------------- losses


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Mean next-token CE on the targets ids[:, start+1:] (predicted at positions start..T-2)."""
    pred = logits[:, start:-1]
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, start + 1 :].reshape(-1))


def distill_term(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Reference-code distillation at one position: mean over layers of smooth_l1 / std(teacher)."""
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        t = t.detach()
        total = total + F.smooth_l1_loss(s, t) / t.std().clamp_min(1e-6)
    return total / len(student)


def codi_losses(llama, prj, problems, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Teacher LM, student LM and distillation losses on one batch (teacher and student share weights)."""
    t_ids = D.stack([D.teacher_ids(p) for p in problems])
    p_ids = D.stack([D.prompt_ids(p.question) for p in problems])
    a_ids = D.stack([D.student_answer_ids(p) for p in problems])
    bot = p_ids.shape[1] - 1
    K = cfg.num_latents

    t_out = llama(input_ids=t_ids, output_hidden_states=True)
    teacher_lm = lm_loss(t_out.logits, t_ids, bot)
    t_hs = t_out.hidden_states

    run = run_latents(llama, prj, p_ids, K)
    s_out = llama(input_ids=a_ids, output_hidden_states=True, **cache_kwargs(llama, run.cache))
    student_lm = lm_loss(s_out.logits, a_ids, 0)

    colon_s = a_ids.shape[1] - 3  # `<eot> The answer is : N </s>`: ":" is third from the end
    colon_t = t_ids.shape[1] - 3
    at = lambda hs, pos: tuple(h[:, pos] for h in hs)  # noqa: E731
    d_answer = distill_term(at(s_out.hidden_states, colon_s), at(t_hs, colon_t))
    losses = {"teacher_lm": teacher_lm, "student_lm": student_lm, "distill_answer": d_answer}
    d = d_answer
    if cfg.step_distill:
        terms = [distill_term(run.latent_states[t], at(t_hs, bot + 1 + t)) for t in range(K)]
        terms.append(distill_term(at(s_out.hidden_states, 0), at(t_hs, bot + 1 + K)))  # eot
        d_steps = torch.stack(terms).mean()
        losses["distill_steps"] = d_steps
        d = d + cfg.step_distill_weight * d_steps
    losses["distill"] = cfg.alpha * d
    losses["loss"] = teacher_lm + student_lm + losses["distill"]
    return losses


# ---------------------------------------------------------------- dev evaluation (teacher-forced, exact)


@torch.no_grad()
def teacher_dev_accuracy(llama, problems) -> float:
    """Fraction whose greedy written chain + answer is entirely right (= every teacher-forced argmax right)."""
    ids = D.stack([D.teacher_ids(p) for p in problems])
    bot = len(D.prompt_ids(problems[0].question)) - 1
    pred = llama(input_ids=ids).logits[:, bot:-1].argmax(-1)
    return (pred == ids[:, bot + 1 :]).all(1).float().mean().item()


@torch.no_grad()
def student_dev_accuracy(llama, prj, problems, num_latents: int) -> float:
    """Fraction whose greedy answer text (after the latents, logits restricted to < eot) is entirely right."""
    p_ids = D.stack([D.prompt_ids(p.question) for p in problems])
    a_ids = D.stack([D.student_answer_ids(p) for p in problems])
    run = run_latents(llama, prj, p_ids, num_latents)
    logits = llama(input_ids=a_ids, **cache_kwargs(llama, run.cache)).logits
    pred = restrict_logits(logits[:, :-1]).argmax(-1)
    return (pred == a_ids[:, 1:]).all(1).float().mean().item()


@torch.no_grad()
def direct_dev_accuracy(llama, problems) -> float:
    ids = D.stack([D.direct_ids(p) for p in problems])
    q = len(D.tokenizer()(problems[0].question)["input_ids"])
    pred = llama(input_ids=ids).logits[:, q - 1 : -1].argmax(-1)
    return (pred == ids[:, q:]).all(1).float().mean().item()


# ---------------------------------------------------------------- loop


def _optimizer(params, lr: float, cfg: TrainConfig, schedule: str = "constant", total: int = 1, min_frac: float = 1.0):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def factor(s: int) -> float:
        warm = min(1.0, (s + 1) / max(1, cfg.warmup_steps))
        if schedule == "constant":
            return warm
        progress = min(1.0, max(0.0, (s - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))
        return warm * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _loop(
    phase: str,
    params,
    step_fn,
    eval_fn,
    *,
    lr: float,
    max_steps: int,
    target: float | None,
    cfg: TrainConfig,
    log: list,
    log_file,
    modules,
    schedule: str = "constant",
    min_lr_frac: float = 1.0,
) -> tuple[int, float | None]:
    """Run `step_fn(step) -> dict of losses` for up to `max_steps`, evaluating every `cfg.eval_every`."""
    from tqdm.auto import tqdm

    opt, sched = _optimizer(params, lr, cfg, schedule, max_steps, min_lr_frac)
    acc = None
    import sys

    bar = tqdm(range(max_steps), desc=phase, disable=not cfg.progress, mininterval=2.0 if sys.stderr.isatty() else 30.0)
    t0, c0 = time.time(), time.process_time()
    steps_done = 0
    for step in bar:
        for m in modules:
            m.train()
        losses = step_fn(step)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        steps_done = step + 1
        rec = {"phase": phase, "step": steps_done, "time_s": round(time.time() - t0, 2), "cpu_s": round(time.process_time() - c0, 2), "lr": sched.get_last_lr()[0]}
        rec.update({k: round(v.item(), 5) for k, v in losses.items()})
        if "distill" in losses:
            rec["distill_share"] = round(losses["distill"].item() / max(losses["loss"].item(), 1e-12), 4)
        if steps_done % cfg.eval_every == 0 or steps_done == max_steps:
            for m in modules:
                m.eval()
            acc = eval_fn()
            rec["dev_acc"] = acc
            bar.write(f"[{phase}] step {steps_done} " + " ".join(f"{k}={v}" for k, v in rec.items() if k not in ("phase", "step")))
        log.append(rec)
        if log_file is not None:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
        bar.set_postfix({k: rec[k] for k in ("loss", "teacher_lm", "student_lm", "distill_share") if k in rec}, refresh=False)
        if acc is not None and "dev_acc" in rec and target is not None and acc >= target:
            break
    bar.close()
    return steps_done, acc


def _resume_phase1(llama, cfg: TrainConfig, seed: int):
    """Load a phase-1 teacher written by a run of the same config and seed (phase 1 is deterministic)."""
    from safetensors.torch import load_file

    d = Path(cfg.resume_phase1)
    meta1 = json.loads((d / "codi.json").read_text())
    same = {
        k: v
        for k, v in asdict(cfg).items()
        if k.startswith("p1_")
        or k in ("task_steps", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "max_position_embeddings", "weight_decay", "grad_clip", "warmup_steps")
    }
    theirs = {k: meta1["config"].get(k) for k in same}
    if meta1["seed"] != seed or theirs != same:
        raise ValueError(f"{d} was trained with a different seed or phase-1 config: {theirs} vs {same}")
    sd = load_file(str(d / "model.safetensors"))
    missing, unexpected = llama.load_state_dict({k[len("codi.") :]: v for k, v in sd.items()}, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"phase-1 checkpoint mismatch: missing={missing} unexpected={unexpected}")
    log1 = [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return (meta1["steps"]["phase1"], meta1["dev"]["teacher_dev_acc"], meta1["wall_time_s"], meta1["cpu_time_s"], log1)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _stage_lengths(cfg: TrainConfig) -> tuple[int, ...]:
    lengths = tuple(cfg.p2_curriculum) or (cfg.task_steps,)
    if any(not 1 <= n <= cfg.task_steps for n in lengths) or lengths[-1] != cfg.task_steps:
        raise ValueError(f"p2_curriculum {lengths}: chain lengths in 1..task_steps ({cfg.task_steps}), ending at task_steps")
    return lengths


def _stage_dir(out: Path, i: int) -> Path:
    return out / "phase2_stages" / f"stage{i}"


def _phase2(llama, prj, cfg: TrainConfig, seed: int, n1: int, out: Path, log: list, log_file, resume: bool):
    """Phase 2 (CODI), one stage per chain length of the curriculum; returns (steps, last dev acc, stages).

    Each finished stage writes `<out>/phase2_stages/stage<i>/` (the checkpoint, and `stage.json` with its steps,
    dev accuracy and log); with `resume`, finished stages are loaded instead of retrained. Training batches
    are indexed by the global step, so a resumed run trains exactly what an uninterrupted one does."""
    from safetensors.torch import load_file, save_file

    done, acc, stages = 0, None, []
    for i, length in enumerate(_stage_lengths(cfg)):
        d = _stage_dir(out, i)
        if resume and (d / "stage.json").exists():
            rec = json.loads((d / "stage.json").read_text())
            if rec["length"] != length or rec["config"] != _config_record(cfg) or rec["seed"] != seed:
                raise ValueError(f"{d} was written by another config or seed; rerun without --resume or with a fresh --out")
            sd = load_file(str(d / "model.safetensors"))
            _load_exact(llama, {k[len("codi.") :]: v for k, v in sd.items() if k.startswith("codi.")}, ignore={"lm_head.weight"})
            _load_exact(prj, {k[len("prj.") :]: v for k, v in sd.items() if k.startswith("prj.")})
            for r in rec["log"]:
                log.append(r)
                log_file.write(json.dumps(r) + "\n")
            done, acc = done + rec["steps"], rec["dev_acc"]
            stages.append({k: rec[k] for k in ("length", "steps", "dev_acc")})
            continue
        dev = D.dev_problems(length, cfg.dev_size)
        start = n1 + done

        def codi_step(step, length=length, start=start):
            return codi_losses(llama, prj, D.train_batch(start + step, cfg.p2_batch, length, seed), cfg)

        first = len(log)
        n, acc = _loop(
            "phase2-codi" if len(_stage_lengths(cfg)) == 1 else f"phase2-codi-len{length}",
            list(llama.parameters()) + list(prj.parameters()),
            codi_step,
            lambda dev=dev: student_dev_accuracy(llama, prj, dev, cfg.num_latents),
            lr=cfg.p2_lr,
            max_steps=cfg.p2_max_steps,
            target=cfg.p2_target,
            cfg=cfg,
            log=log,
            log_file=log_file,
            modules=[llama, prj],
            schedule=cfg.p2_schedule,
            min_lr_frac=cfg.p2_min_lr_frac,
        )
        done += n
        stages.append({"length": length, "steps": n, "dev_acc": acc})
        d.mkdir(parents=True, exist_ok=True)
        save_file(checkpoint_state_dict(llama, prj), str(d / "model.safetensors"), metadata={"format": "pt"})
        rec = {"length": length, "steps": n, "dev_acc": acc, "seed": seed, "config": _config_record(cfg), "log": log[first:]}
        tmp = d / "stage.json.tmp"
        tmp.write_text(json.dumps(rec) + "\n")
        tmp.replace(d / "stage.json")  # written last: a stage without stage.json is retrained
    return done, acc, stages


def _config_record(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("progress", "extra", "resume_phase1")}))


def _load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], ignore: set[str] = frozenset()) -> None:
    """Load `state` into `module`, refusing any missing (except `ignore`), unused or mis-shaped key."""
    own = {k: v.shape for k, v in module.state_dict().items() if k not in ignore}
    got = {k: v.shape for k, v in state.items()}
    if own != got:
        bad = sorted(k for k in set(own) & set(got) if own[k] != got[k])
        raise ValueError(f"stage checkpoint mismatch: missing={sorted(set(own) - set(got))} unused={sorted(set(got) - set(own))} misshaped={bad}")
    module.load_state_dict(state, strict=not ignore)


def train(cfg: TrainConfig, out_dir: str | Path, seed: int = 0, resume: bool = False) -> TrainResult:
    """Train `cfg` (phase 1 + phase 2 for "codi", or the direct baseline) and write its checkpoint to `out_dir`.

    With `resume`, a phase-1 teacher in `<out>/phase1` and finished curriculum stages are reused."""
    if cfg.objective != "direct":
        _stage_lengths(cfg)  # refuse a bad curriculum before any work
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    _seed_all(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_config = cfg.base_config()
    llama = build_llama(base_config)
    dev = D.dev_problems(cfg.task_steps, cfg.dev_size)
    log: list[dict[str, Any]] = []
    t_start, c_start = time.time(), time.process_time()
    meta: dict[str, Any] = {}
    with open(out / "train_log.jsonl", "w") as log_file:
        if cfg.objective == "direct":

            def direct_step(step):
                ids = D.stack([D.direct_ids(p) for p in D.train_batch(step, cfg.direct_batch, cfg.task_steps, seed)])
                q = ids.shape[1] - 7  # `The answer is : N </s>` is 6 tokens; predictions start at the last question token
                return {"loss": lm_loss(llama(input_ids=ids).logits, ids, q)}

            n, acc = _loop(
                "direct",
                list(llama.parameters()),
                direct_step,
                lambda: direct_dev_accuracy(llama, dev),
                lr=cfg.direct_lr,
                max_steps=cfg.direct_steps,
                target=None,
                cfg=cfg,
                log=log,
                log_file=log_file,
                modules=[llama],
            )
            prj = None
            steps = {"direct": n, "total": n}
            accs = {"direct_dev_acc": acc}
            objective = {"name": "direct", "description": "`<s> question The answer is : N </s>`, LM loss on the answer; no chain, no latents"}
        else:
            prj = build_prj(cfg.hidden_size, cfg.prj_dropout)  # built before phase 1: resuming keeps the RNG stream

            def teacher_step(step):
                ids = D.stack([D.teacher_ids(p) for p in D.train_batch(step, cfg.p1_batch, cfg.task_steps, seed)])
                bot = ids.shape[1] - (cfg.task_steps + 8)  # after <bot>: n values, eot, The answer is : N </s>
                return {"loss": lm_loss(llama(input_ids=ids).logits, ids, bot)}

            if resume and not cfg.resume_phase1 and (out / "phase1" / "codi.json").exists():
                cfg = dataclasses.replace(cfg, resume_phase1=str(out / "phase1"))
            if cfg.resume_phase1:
                n1, acc1, t_p1, c_p1, log1 = _resume_phase1(llama, cfg, seed)
                log.extend(log1)
                for rec in log1:
                    log_file.write(json.dumps(rec) + "\n")
            else:
                n1, acc1 = _loop(
                    "phase1-teacher",
                    list(llama.parameters()),
                    teacher_step,
                    lambda: teacher_dev_accuracy(llama, dev),
                    lr=cfg.p1_lr,
                    max_steps=cfg.p1_max_steps,
                    target=cfg.p1_target,
                    cfg=cfg,
                    log=log,
                    log_file=log_file,
                    modules=[llama],
                )
                t_p1, c_p1 = time.time() - t_start, time.process_time() - c_start
                if cfg.save_phase1:
                    meta1 = {
                        "objective": {"name": "teacher-phase1"},
                        "seed": seed,
                        "steps": {"phase1": n1, "total": n1},
                        "dev": {"teacher_dev_acc": acc1},
                        "wall_time_s": round(t_p1, 1),
                        "cpu_time_s": round(c_p1, 1),
                        "num_latents": 0,
                        "answer_prefix": ANSWER_PREFIX,
                        "lora_alpha": None,
                        "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress", "extra")},
                    }
                    save_checkpoint(out / "phase1", llama, None, meta1, base_config)
                    (out / "phase1" / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))

            n2, acc2, stages = _phase2(llama, prj, cfg, seed, n1, out, log, log_file, resume)
            steps = {"phase1": n1, "phase2": n2, "total": n1 + n2}
            accs = {
                "teacher_dev_acc_end_phase1": acc1,
                "student_dev_acc": acc2,
                "teacher_dev_acc": teacher_dev_accuracy(llama.eval(), dev),
                "phase2_stages": stages,
                "phase1_wall_s": round(t_p1, 1),
                "phase1_cpu_s": round(c_p1, 1),
            }
            objective = {
                "name": "codi+per-step-alignment" if cfg.step_distill else "codi",
                "published_codi": not cfg.step_distill,
                "description": (
                    "teacher LM (after <bot>) + student LM (after <eot>) + alpha * [distill at ':' over all hidden "
                    "states, smooth L1 / teacher std, mean over layers"
                    + (
                        " + step_distill_weight * mean over latent t (toward teacher at v_t) and eot of the same term] -- the per-step term is NOT the published CODI objective"
                        if cfg.step_distill
                        else "]"
                    )
                ),
                "alpha": cfg.alpha,
                "step_distill": cfg.step_distill,
                "step_distill_weight": cfg.step_distill_weight,
                "init": "phase 1 teacher (same network), prj freshly initialised",
            }
    wall, cpu = time.time() - t_start, time.process_time() - c_start
    if cfg.objective != "direct" and cfg.resume_phase1:
        wall, cpu = wall + t_p1, cpu + c_p1  # the resumed phase 1's own time
    meta = {
        "num_latents": cfg.num_latents if cfg.objective != "direct" else 0,
        "answer_prefix": ANSWER_PREFIX,
        "lora_alpha": None,
        "objective": objective,
        "task": {
            "name": "arithmetic",
            "module": "interp.data.arithmetic",
            "steps": cfg.task_steps,
            "modulus": 10,
            "dev_seed": D.DEV_SEED,
            "test_seed": D.TEST_SEED,
            "pairs_seed": D.PAIRS_SEED,
            "train_batch_seeds": f"{D.TRAIN_SEED_BASE} * (seed + 1) + 16 * step + k, held-out questions excluded",
        },
        "seed": seed,
        "steps": steps,
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1),
        "dev": accs,
        "preset": cfg.name,
        "vocab": list(VOCAB),
        "special_ids": {"pad": len(VOCAB), "bot": len(VOCAB) + 1, "eot": len(VOCAB) + 2},
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress", "extra")},
        "torch_threads": torch.get_num_threads(),
    }
    llama.eval()
    if prj is not None:
        prj.eval()
    save_checkpoint(out, llama, prj, meta, base_config)
    return TrainResult(out, meta, log, llama, prj)
