"""Coconut (Hao et al. 2024) trained by its published curriculum on the arithmetic task, and its controls.

The text is the official format (`dataset.py` of facebookresearch/coconut @ 27273cb):

    question + "\\n"  (with <s>)   <|start-latent|>  <|latent|> x n  <|end-latent|>   step + "\\n" ...   "### " + answer  </s>

where the steps are the intermediate values (`7 +5 *3 -2 *7 +4 -1` -> steps `2 6 4 8 2 1`, answer `1`).
`cot_latent_sample` builds `input_ids` / `labels` exactly as `get_cot_latent_dataset` (stage k
replaces the first k steps by k * c_thought latents; past `max_latent_stage` all steps are dropped;
with probability `uniform_prob` a sample's stage is drawn uniformly from 0..len(steps); labels are
-100 on the question, the two markers and the latents, the tokens themselves after). The forward
(`group_forward`) is the official multi-pass one with a KV cache: pass 0 runs the question and
`<|start-latent|>`, each latent is fed the final-normed last-layer state (HF `hidden_states[-1]`) at
the position before it, gradients flowing through every thought; the loss is the token-mean CE of the
whole batch. Stage k trains for at most `stage_max_steps[k]` steps (early stop on dev accuracy),
AdamW is rebuilt at each stage, and all steps are latent at the last stage.

Objectives (`CoconutConfig.mode`):
- "coconut": the continuous thoughts above. Checkpoint: the official `checkpoint_N`, a raw
  `torch.save` of the `Coconut` module's state dict (`base_causallm.<HF Llama keys>` + `embedding.weight`),
  loadable by `interp.load_coconut(run_dir, run_dir / "base", num_latents=6)`.
- "pause": the official pause-as-thought control (run.py with `coconut: False`): the same curriculum and
  tokens, the latent positions hold the learned `<|latent|>` embedding, nothing is fed back. Checkpoint:
  `checkpoint_N` holding the plain `LlamaForCausalLM` state dict (as run.py saves a non-Coconut model);
  load it with `load_plain(run_dir)`.
- "direct": the official no-CoT control (`no_cot: True`): `question\\n### answer</s>`, no markers, no
  latents, one stage. Same checkpoint format as "pause".

The base directory (`base/`) holds the HF config (vocab WITHOUT the three markers) and this format's
tokenizer (`coconut_tokenizer`), as `interp.load_coconut` expects.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from interp.train import data as D
from interp.train.tokenizer import llama_config

# ---------------------------------------------------------------- tokenizer (the Coconut text format)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
NEWLINE, HASHES = "\n", "###"
COCONUT_VOCAB: tuple[str, ...] = (BOS, EOS, UNK, *[str(i) for i in range(10)], "+", "-", "*", "=", NEWLINE, HASHES)
CV = len(COCONUT_VOCAB)  # 19 base tokens
BOS_ID, EOS_ID = 0, 1
MARKERS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")
START_ID, END_ID, LATENT_ID = CV, CV + 1, CV + 2  # the ids `add_tokens` gives them, in this order


def build_coconut_tokenizer():
    """The raw `tokenizers.Tokenizer`: spaces and tabs dropped; `###`, `\\n`, `+ - *` and every digit
    are tokens; `<s>` prepended (as Llama's tokenizer); decoding joins tokens with spaces."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(COCONUT_VOCAB)}, unk_token=UNK))
    tok.add_special_tokens([BOS, EOS, UNK])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"###|\n|[+*=\-]|\d"), behavior="isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)])
    return tok


def coconut_tokenizer():
    """The base tokenizer (no markers) as a `transformers.PreTrainedTokenizerFast`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=build_coconut_tokenizer(), bos_token=BOS, eos_token=EOS, unk_token=UNK)


_RAW = None


def _raw():
    global _RAW
    if _RAW is None:
        _RAW = build_coconut_tokenizer()
    return _RAW


def encode(text: str, add_special_tokens: bool = True) -> list[int]:
    return _raw().encode(text, add_special_tokens=add_special_tokens).ids


def decode(ids: Sequence[int]) -> str:
    return " ".join(COCONUT_VOCAB[i] if i < CV else MARKERS[i - CV] for i in ids)


def base_config(cfg: CoconutConfig | None = None):
    """The `LlamaConfig` of the base (vocab_size = 19, without the markers): the CODI trainer's, on this vocabulary."""
    c = cfg or CoconutConfig()
    shape = dict(num_layers=c.num_layers, hidden_size=c.hidden_size, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, intermediate_size=c.intermediate_size)
    return llama_config(**shape, max_position_embeddings=c.max_position_embeddings, vocab_size=CV)


def save_base_dir(out_dir: str | Path, config) -> Path:
    """`config.json`, `tokenizer.json`, `tokenizer_config.json` (no weights, no markers) in `out_dir`."""
    from transformers import AutoConfig, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    coconut_tokenizer().save_pretrained(out)
    for extra in ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "generation_config.json"):
        if (out / extra).exists():
            (out / extra).unlink()
    tok = AutoTokenizer.from_pretrained(out)
    for s in ("7 +5 *3 -2 *7 +4 -1\n", "### 4"):
        if tok(s)["input_ids"] != encode(s):
            raise RuntimeError(f"tokenizer in {out} does not round-trip on {s!r}")
    if AutoConfig.from_pretrained(out).vocab_size != CV:
        raise RuntimeError(f"config in {out} did not round-trip")
    return out


# ---------------------------------------------------------------- samples (get_dataset + get_cot_latent_dataset)


def problem_steps(problem, step_format: str = "equation") -> list[str]:
    """The written steps: "equation" `7 +5 = 2` (the previous value, the operation, its result) or "value" `2`."""
    if step_format == "value":
        return [str(v) for v in problem.values]
    if step_format != "equation":
        raise ValueError(f"step_format must be 'equation' or 'value', got {step_format!r}")
    prev = [problem.x0, *problem.values[:-1]]
    return [f"{x} {op}{c} = {v}" for x, (op, c), v in zip(prev, problem.ops, problem.values)]


def tokenize_problem(problem, step_format: str = "equation") -> dict[str, Any]:
    """`get_dataset`'s tokenize_sample on {question, steps (`problem_steps`), answer}."""
    return {
        "question_tokenized": encode(problem.question + "\n", True),
        "steps_tokenized": [encode(s + "\n", False) for s in problem_steps(problem, step_format)],
        "answer_tokenized": encode("### " + str(problem.answer), False) + [EOS_ID],
    }


def cot_latent_sample(
    sample: dict[str, Any],
    scheduled_stage: int,
    *,
    max_latent_stage: int = 6,
    c_thought: int = 1,
    uniform_prob: float = 0.0,
    pad_latent_to_max: bool = False,
    no_cot: bool = False,
    no_special_marker: bool = False,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """`get_cot_latent_dataset`'s process_dataset, line for line (rng: the module `random` there)."""
    rng = rng or random
    n_additional_tokens = 0 if no_special_marker else 2
    if rng.random() < uniform_prob:
        stage = rng.choice(list(range(len(sample["steps_tokenized"]) + 1)))
    else:
        stage = scheduled_stage
    if stage > max_latent_stage:
        n_skip_steps = 10000
        n_latent_tokens = max_latent_stage if pad_latent_to_max else min(len(sample["steps_tokenized"]), max_latent_stage)
    else:
        n_skip_steps, n_latent_tokens = stage, stage
    if no_cot:
        n_skip_steps = 100
        n_latent_tokens = 0
    n_latent_tokens *= c_thought
    q = sample["question_tokenized"]
    tokens = (
        q
        + ([] if no_special_marker else [START_ID])
        + [LATENT_ID] * n_latent_tokens
        + ([] if no_special_marker else [END_ID])
        + [t for s in sample["steps_tokenized"][n_skip_steps:] for t in s]
        + sample["answer_tokenized"]
    )
    cut = len(q) + n_latent_tokens + n_additional_tokens
    return {"input_ids": tokens, "labels": [-100] * cut + tokens[cut:], "n_latent": n_latent_tokens, "stage": stage}


def question_latent_ids(question: str, n_latent: int, no_special_marker: bool = False) -> list[int]:
    """`get_question_latent_dataset`: the evaluation prompt (question, markers, n latents)."""
    q = encode(question + "\n", True)
    return q + ([] if no_special_marker else [START_ID]) + [LATENT_ID] * n_latent + ([] if no_special_marker else [END_ID])


def official_stage(epoch: int, epochs_per_stage: int) -> int:
    """run.py: `scheduled_stage = epoch // epochs_per_stage` (here an "epoch" is a stage slot of steps)."""
    return epoch // epochs_per_stage


# ---------------------------------------------------------------- configuration


@dataclass
class CoconutConfig:
    name: str = "coconut"
    mode: str = "coconut"  # "coconut" | "pause" | "direct"
    task_steps: int = 6
    max_latent_stage: int = 6
    c_thought: int = 1
    pad_latent_to_max: bool = False
    step_format: str = "equation"  # see problem_steps
    # model (the embedded model's size)
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 336
    max_position_embeddings: int = 64
    # optimisation: AdamW rebuilt at each stage, constant lr after a short linear warmup
    batch_size: int = 128
    lr_stage0: float = 2e-3
    lr: float = 1e-3  # stages >= 1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)  # as the embedded CODI trainer; (0.9, 0.999) stayed at chance for 375 stage-0 steps
    warmup_steps: int = 20
    grad_clip: float | None = 1.0
    # curriculum: per stage 0..max_latent_stage (the last also trains past it)
    stage_max_steps: tuple[int, ...] = (600, 600, 1200, 1000, 1000, 1000, 1500)
    stage_min_steps: tuple[int, ...] = (0, 0, 0, 0, 0, 0, 0)
    stage_target: tuple[float, ...] = (0.97, 0.97, 0.96, 0.95, 0.95, 0.95, 1.01)  # dev answer accuracy that ends a stage
    uniform_prob: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # per stage (official: one value for all)
    patience: int | None = None  # evals without a dev improvement that end a stage (None: never)
    eval_every: int = 50
    dev_size: int = D.DEV_SIZE
    save_every: int = 100
    num_threads: int | None = 1
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return 1 if self.mode == "direct" else self.max_latent_stage + 1

    def stage_lr(self, stage: int) -> float:
        return self.lr_stage0 if stage == 0 else self.lr

    def eval_latents(self, stage: int) -> int:
        """`get_question_latent_dataset`'s k for a 6-step problem at `stage`."""
        if self.mode == "direct":
            return 0
        m = self.max_latent_stage if self.pad_latent_to_max else min(self.max_latent_stage, self.task_steps)
        return min(m, stage) * self.c_thought


PRESETS: dict[str, CoconutConfig] = {
    "coconut": CoconutConfig(),
    # The shipped model (interp/embedded/coconut/, docs/coconut_model.md): longer stages 2-6, the official
    # uniform_prob mixing (0.1) from stage 3 on.
    "embedded": CoconutConfig(
        name="embedded",
        stage_max_steps=(800, 800, 1500, 1500, 1000, 1000, 3500),
        stage_target=(0.98, 0.98, 0.97, 0.97, 0.97, 0.97, 0.99),
        uniform_prob=(0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1),
    ),
    "micro": CoconutConfig(
        name="micro",
        task_steps=3,
        max_latent_stage=3,
        num_layers=2,
        hidden_size=32,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        max_position_embeddings=64,
        batch_size=16,
        lr_stage0=1e-2,
        lr=3e-3,
        warmup_steps=2,
        stage_max_steps=(8, 4, 4, 6),
        stage_target=(1.01, 1.01, 1.01, 1.01),
        uniform_prob=(0.0, 0.0, 0.3, 0.3),
        eval_every=4,
        dev_size=16,
        save_every=3,
        progress=False,
    ),
}


def control_config(cfg: CoconutConfig, mode: str) -> CoconutConfig:
    """The control of `cfg`: same model, data, optimiser and mixing.

    "pause": the same curriculum with the same per-stage budgets and early-stopping rule (its own dev
    accuracy); "direct": one stage of sum(stage_max_steps) steps, no early stop (official no_cot), so it
    trains at least as many steps as the Coconut run it controls."""
    import dataclasses

    if mode == "pause":
        return dataclasses.replace(cfg, name=f"{cfg.name}-pause", mode="pause")
    if mode != "direct":
        raise ValueError(f"control mode must be 'pause' or 'direct', got {mode!r}")
    return dataclasses.replace(cfg, name=f"{cfg.name}-direct", mode="direct", stage_max_steps=(sum(cfg.stage_max_steps),), stage_min_steps=(0,), stage_target=(1.01,), patience=None)


def get_preset(name: str, **overrides) -> CoconutConfig:
    import dataclasses

    if name not in PRESETS:
        raise ValueError(f"unknown coconut preset {name!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------- model


def build_model(cfg: CoconutConfig, attn_implementation: str = "eager"):
    """A fresh `LlamaForCausalLM` with the base vocabulary + the 3 markers (tied embeddings)."""
    from transformers import LlamaForCausalLM

    c = copy.deepcopy(base_config(cfg))
    c.vocab_size = CV + 3  # resize_token_embeddings(len(tokenizer))
    c._attn_implementation = attn_implementation
    return LlamaForCausalLM(c)


def coconut_state_dict(llama) -> dict[str, torch.Tensor]:
    """The `Coconut` module's state dict: `base_causallm.<key>` + `embedding.weight` (same tensor)."""
    sd = {"base_causallm." + k: v.detach().clone() for k, v in llama.state_dict().items()}
    sd["embedding.weight"] = sd["base_causallm.model.embed_tokens.weight"]
    if "base_causallm.lm_head.weight" in sd:
        sd["base_causallm.lm_head.weight"] = sd["base_causallm.model.embed_tokens.weight"]  # tied: one storage
    return sd


def plain_state_dict(llama) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in llama.state_dict().items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def _hf_llama(run_dir: str | Path, checkpoint: str | None) -> tuple[Any, dict[str, torch.Tensor]]:
    """A fresh eager `LlamaForCausalLM` of the run's base config (+3 marker rows) and the checkpoint's state dict."""
    from transformers import AutoConfig, LlamaForCausalLM

    run_dir = Path(run_dir)
    path = run_dir / checkpoint if checkpoint else latest_checkpoint(run_dir)
    config = AutoConfig.from_pretrained(run_dir / "base")
    config.vocab_size = config.vocab_size + 3
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config), torch.load(path, map_location="cpu", weights_only=True)


def load_plain(run_dir: str | Path, checkpoint: str | None = None):
    """A pause or direct control (`checkpoint_N` of plain LlamaForCausalLM keys) as a HF model, every key checked."""
    llama, sd = _hf_llama(run_dir, checkpoint)
    llama.load_state_dict(sd, strict=True)
    return llama.eval()


def load_coconut_hf(run_dir: str | Path, checkpoint: str | None = None):
    """A Coconut `checkpoint_N` as the plain HF model (for this module's own forward)."""
    llama, sd = _hf_llama(run_dir, checkpoint)
    emb = sd.pop("embedding.weight")
    lm = {k[len("base_causallm.") :]: v for k, v in sd.items()}
    if not torch.equal(emb, lm["model.embed_tokens.weight"]):
        raise ValueError("embedding.weight differs from base_causallm.model.embed_tokens.weight")
    llama.load_state_dict(lm, strict=True)
    return llama.eval()


def latest_checkpoint(run_dir: str | Path) -> Path:
    found = sorted((int(p.name.split("_")[1]), p) for p in Path(run_dir).glob("checkpoint_*") if p.name.split("_")[1].isdigit())
    if not found:
        raise FileNotFoundError(f"no checkpoint_N in {run_dir}")
    return found[-1][1]


def _cache_kwargs(llama, cache) -> dict:
    from interp.train.modeling import cache_kwargs

    return cache_kwargs(llama, cache)


# ---------------------------------------------------------------- the forward (official multi-pass)


@dataclass
class GroupOutput:
    logits: torch.Tensor  # [B, T - s, V]: logits of positions s.. (s = first latent, or 0)
    offset: int  # s
    thoughts: torch.Tensor | None  # [B, n, d] what was fed at the latent positions


def group_forward(llama, ids: torch.Tensor, n_latent: int, mode: str = "coconut", thoughts_override: torch.Tensor | None = None, use_cache: bool = False) -> GroupOutput:
    """The forward of equal-layout sequences `ids` [B, T] holding `n_latent` latent tokens.

    "coconut": n + 1 passes with a KV cache (the official loop): pass 0 over the tokens before the first
    latent; thought t is the final-normed state (hidden_states[-1]) at the position before latent t; the last
    pass runs from the last latent to the end. Gradients flow through every thought and cache entry.
    `thoughts_override` [B, n, d] replaces every fed thought (one pass then suffices; for measurements).
    "pause" / "direct", or n = 0: one pass over the token embeddings (`<|latent|>` is an ordinary token).
    """
    embeds = llama.get_input_embeddings()(ids)
    if mode != "coconut" or n_latent == 0:
        out = llama(inputs_embeds=embeds, use_cache=use_cache)
        return GroupOutput(out.logits, 0, None) if not use_cache else _with_cache(GroupOutput(out.logits, 0, None), out)
    s = int((ids[0] == LATENT_ID).nonzero()[0])
    if not bool((ids[:, s : s + n_latent] == LATENT_ID).all()):
        raise ValueError("group_forward expects the latents at the same columns in every row")
    if thoughts_override is not None:
        x = torch.cat([embeds[:, :s], thoughts_override.to(embeds), embeds[:, s + n_latent :]], 1)
        out = llama(inputs_embeds=x, use_cache=use_cache)
        g = GroupOutput(out.logits[:, s:], s, thoughts_override)
        return _with_cache(g, out) if use_cache else g
    out = llama(inputs_embeds=embeds[:, :s], use_cache=True, output_hidden_states=True)
    cache = out.past_key_values
    h = out.hidden_states[-1][:, -1:]
    fed = [h]
    for _ in range(n_latent - 1):
        out = llama(inputs_embeds=h, use_cache=True, output_hidden_states=True, **_cache_kwargs(llama, cache))
        cache = out.past_key_values
        h = out.hidden_states[-1][:, -1:]
        fed.append(h)
    out = llama(inputs_embeds=torch.cat([h, embeds[:, s + n_latent :]], 1), use_cache=True, **_cache_kwargs(llama, cache))
    g = GroupOutput(out.logits, s + n_latent - 1, torch.cat(fed, 1))
    g.fed = fed  # type: ignore[attr-defined]  # the thoughts as they entered the graph, [B, 1, d] each
    return _with_cache(g, out) if use_cache else g


def _with_cache(g: GroupOutput, out) -> GroupOutput:
    g.cache = out.past_key_values  # type: ignore[attr-defined]
    return g


def group_loss(llama, ids: torch.Tensor, labels: torch.Tensor, n_latent: int, mode: str) -> tuple[torch.Tensor, int]:
    """(sum of the next-token CE over labelled targets, their number): the official shifted CE."""
    g = group_forward(llama, ids, n_latent, mode)
    logits = g.logits[:, :-1]
    targets = labels[:, g.offset + 1 :]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def batch_samples(problems, stage: int, cfg: CoconutConfig, rng: random.Random) -> list[dict[str, Any]]:
    no_cot = cfg.mode == "direct"
    up = cfg.uniform_prob[min(stage, len(cfg.uniform_prob) - 1)]
    return [
        cot_latent_sample(
            tokenize_problem(p, cfg.step_format),
            stage,
            max_latent_stage=cfg.max_latent_stage,
            c_thought=cfg.c_thought,
            uniform_prob=0.0 if no_cot else up,
            pad_latent_to_max=cfg.pad_latent_to_max,
            no_cot=no_cot,
            no_special_marker=no_cot,
            rng=rng,
        )
        for p in problems
    ]


def batch_loss(llama, samples: list[dict[str, Any]], mode: str) -> tuple[torch.Tensor, dict[int, int]]:
    """Token-mean CE over the batch (as the official padded batch's CE), computed per latent-count group."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault((s["n_latent"], len(s["input_ids"])), []).append(s)
    total, count = 0.0, 0
    for (n, _), rows in sorted(groups.items()):
        ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        labels = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        loss, c = group_loss(llama, ids, labels, n, mode)
        total, count = total + loss, count + c
    counts: dict[int, int] = {}
    for s in samples:
        counts[s["n_latent"]] = counts.get(s["n_latent"], 0) + 1
    return total / max(count, 1), counts


def step_rng(seed: int, global_step: int) -> random.Random:
    return random.Random(seed * 100_003 + global_step)


# ---------------------------------------------------------------- evaluation (greedy, as Coconut.generate)


@torch.no_grad()
def greedy_generate(llama, questions: Sequence[str], n_latent: int, mode: str = "coconut", thoughts_override: torch.Tensor | None = None, max_new_tokens: int = 44) -> dict[str, Any]:
    """Batched greedy decoding from `question_latent_ids` (all questions of one length): returns the
    generated ids per row (up to, without, eos), the texts, the answers (text after the last '#') and
    the fed thoughts [B, n, d]."""
    no_marker = mode == "direct"
    rows = [question_latent_ids(q, n_latent if not no_marker else 0, no_marker) for q in questions]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("greedy_generate batches questions of one token length")
    ids = torch.tensor(rows, dtype=torch.long)
    g = group_forward(llama, ids, n_latent if not no_marker else 0, mode, thoughts_override, use_cache=True)
    cache = g.cache
    nxt = g.logits[:, -1].argmax(-1)
    B = len(questions)
    gen = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    for _ in range(max_new_tokens):
        for r in range(B):
            if not done[r]:
                if int(nxt[r]) == EOS_ID:
                    done[r] = True
                else:
                    gen[r].append(int(nxt[r]))
        if bool(done.all()):
            break
        out = llama(input_ids=nxt[:, None], use_cache=True, **_cache_kwargs(llama, cache))
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)
    texts = [decode(x) for x in gen]
    answers = [t.split("#")[-1].replace(",", "").strip() for t in texts]
    return {"ids": gen, "texts": texts, "answers": answers, "thoughts": g.thoughts}


def answer_accuracy(llama, problems, n_latent: int, mode: str, batch: int = 250, thoughts_override: torch.Tensor | None = None) -> tuple[float, list[str]]:
    answers: list[str] = []
    for i in range(0, len(problems), batch):
        chunk = problems[i : i + batch]
        ov = thoughts_override[i : i + batch] if thoughts_override is not None else None
        answers += greedy_generate(llama, [p.question for p in chunk], n_latent, mode, ov)["answers"]
    acc = sum(a == str(p.answer) for a, p in zip(answers, problems)) / len(problems)
    return acc, answers


# ---------------------------------------------------------------- training


def _optimizer(llama, cfg: CoconutConfig, stage: int):
    opt = torch.optim.AdamW(llama.parameters(), lr=cfg.stage_lr(stage), weight_decay=cfg.weight_decay, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    return opt, sched


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_checkpoint(llama, cfg: CoconutConfig, out: Path, global_step: int) -> Path:
    sd = coconut_state_dict(llama) if cfg.mode == "coconut" else plain_state_dict(llama)
    path = out / f"checkpoint_{global_step}"
    _atomic_save(sd, path)
    return path


def _load_weights(llama, cfg: CoconutConfig, path: Path) -> None:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if cfg.mode == "coconut":
        sd.pop("embedding.weight")
        sd = {k[len("base_causallm.") :]: v for k, v in sd.items()}
    llama.load_state_dict(sd, strict=True)


def train_coconut(cfg: CoconutConfig, out_dir: str | Path, seed: int = 0, resume: bool = False, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train `cfg` into `out_dir` (checkpoint_N files, train_state.pt, train_log.jsonl, run.json, base/).

    resume: continue from `out_dir/train_state.pt` (the last saved step): the result equals an
    uninterrupted run of the same config and seed. stop_after_steps: stop (after saving) once this
    many global steps are done (for tests and for splitting a run).
    """
    from tqdm.auto import tqdm

    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    torch.manual_seed(seed)
    llama = build_model(cfg)
    state_path = out / "train_state.pt"
    dev = D.dev_problems(cfg.task_steps, cfg.dev_size)
    st: dict[str, Any] = {"stage": 0, "step_in_stage": 0, "global_step": 0, "cpu_s": 0.0, "wall_s": 0.0, "stages": [], "best": -1.0, "bad_evals": 0, "done": False}
    opt = sched = None
    if resume and state_path.exists():
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        st = saved["state"]
        if not _same_run(saved["config"], _cfg_dict(cfg), st["stage"]) or saved["seed"] != seed:
            raise ValueError(f"{state_path} was written by another config or seed")
        _load_weights(llama, cfg, out / saved["checkpoint"])
        if not st["done"] and saved["optimizer"] is not None:  # None: saved at a stage end (reset next)
            opt, sched = _optimizer(llama, cfg, st["stage"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
        log_lines = (out / "train_log.jsonl").read_text().splitlines() if (out / "train_log.jsonl").exists() else []
        log_lines = [ln for ln in log_lines if ln.strip() and json.loads(ln)["global_step"] <= st["global_step"]]
        (out / "train_log.jsonl").write_text("".join(ln + "\n" for ln in log_lines))
    else:
        for p in out.glob("checkpoint_*"):
            p.unlink()
        (out / "train_log.jsonl").write_text("")
    save_base_dir(out / "base", base_config(cfg))

    def save(final: bool = False) -> None:
        ck = _write_checkpoint(llama, cfg, out, st["global_step"])
        _atomic_save(
            {
                "config": _cfg_dict(cfg),
                "seed": seed,
                "state": st,
                "checkpoint": ck.name,
                "optimizer": opt.state_dict() if opt is not None else None,
                "scheduler": sched.state_dict() if sched is not None else None,
            },
            state_path,
        )
        keep = {ck.name} | {f"checkpoint_{s['end_global_step']}" for s in st["stages"]}
        for p in out.glob("checkpoint_*"):
            if p.name not in keep and not p.name.endswith(".tmp"):
                p.unlink()

    log_file = open(out / "train_log.jsonl", "a")
    c0, t0 = time.process_time() - st["cpu_s"], time.time() - st["wall_s"]
    try:
        while not st["done"]:
            stage = st["stage"]
            if opt is None:
                opt, sched = _optimizer(llama, cfg, stage)
            budget = cfg.stage_max_steps[stage] if cfg.mode != "direct" else cfg.stage_max_steps[0]
            k_eval = cfg.eval_latents(stage)
            bar = tqdm(total=budget, initial=st["step_in_stage"], desc=f"{cfg.mode} stage {stage}", disable=not cfg.progress, mininterval=30.0)
            end_stage = st["step_in_stage"] >= budget
            while not end_stage:
                llama.train()
                g = st["global_step"]
                problems = D.train_batch(g, cfg.batch_size, cfg.task_steps, seed)
                samples = batch_samples(problems, stage, cfg, step_rng(seed, g))
                loss, counts = batch_loss(llama, samples, cfg.mode)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(llama.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                st["global_step"] += 1
                st["step_in_stage"] += 1
                bar.update(1)
                rec = {"global_step": st["global_step"], "stage": stage, "step": st["step_in_stage"], "loss": round(loss.item(), 5), "lr": sched.get_last_lr()[0], "latent_counts": counts}
                n = st["step_in_stage"]
                if n % cfg.eval_every == 0 or n == budget:
                    llama.eval()
                    acc, _ = answer_accuracy(llama, dev, k_eval, cfg.mode)
                    rec["dev_acc"] = acc
                    rec["dev_latents"] = k_eval
                    if acc > st["best"]:
                        st["best"], st["bad_evals"] = acc, 0
                    else:
                        st["bad_evals"] += 1
                    if n >= cfg.stage_min_steps[stage] and (acc >= cfg.stage_target[stage] or (cfg.patience is not None and st["bad_evals"] >= cfg.patience)):
                        end_stage = True
                    bar.write(f"[{cfg.mode} stage {stage}] step {n} (global {st['global_step']}) loss {rec['loss']} dev_acc {acc:.3f} cpu {time.process_time() - c0:.0f}s")
                if n >= budget:
                    end_stage = True
                rec["cpu_s"] = round(time.process_time() - c0, 2)
                rec["wall_s"] = round(time.time() - t0, 2)
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                st["cpu_s"], st["wall_s"] = time.process_time() - c0, time.time() - t0
                if end_stage:
                    last_acc = rec.get("dev_acc")
                    if last_acc is None:
                        llama.eval()
                        last_acc, _ = answer_accuracy(llama, dev, k_eval, cfg.mode)
                    st["stages"].append({"stage": stage, "steps": n, "end_global_step": st["global_step"], "dev_acc": last_acc, "dev_latents": k_eval, "cpu_s": round(st["cpu_s"], 1)})
                    st["stage"] += 1
                    st["step_in_stage"], st["best"], st["bad_evals"] = 0, -1.0, 0
                    st["done"] = st["stage"] >= cfg.num_stages
                    opt = sched = None  # the official reset_optimizer
                    save()
                elif st["global_step"] % cfg.save_every == 0:
                    save()
                if stop_after_steps is not None and st["global_step"] >= stop_after_steps and not st["done"]:
                    if not end_stage and st["global_step"] % cfg.save_every != 0:
                        save()
                    bar.close()
                    return _summary(cfg, out, seed, st, llama, finished=False)
            bar.close()
    finally:
        log_file.close()
    summary = _summary(cfg, out, seed, st, llama, finished=True)
    (out / "run.json").write_text(json.dumps(summary["meta"], indent=2) + "\n")
    return summary


PER_STAGE = ("stage_max_steps", "stage_min_steps", "stage_target", "uniform_prob")


def _same_run(saved: dict[str, Any], new: dict[str, Any], stage: int) -> bool:
    """A run resumed in `stage` under `new` equals a fresh run of `new`: every setting is the same, except
    per-stage settings of stages not yet started (> `stage`)."""
    if {k: v for k, v in saved.items() if k not in PER_STAGE} != {k: v for k, v in new.items() if k not in PER_STAGE}:
        return False
    return all(list(saved[k])[: stage + 1] == list(new[k])[: stage + 1] for k in PER_STAGE)


def _cfg_dict(cfg: CoconutConfig) -> dict[str, Any]:
    d = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "extra", "num_threads")}
    return json.loads(json.dumps(d))


def _summary(cfg, out, seed, st, llama, finished: bool) -> dict[str, Any]:
    meta = {
        "family": "coconut" if cfg.mode == "coconut" else f"plain-llama ({cfg.mode} control)",
        "mode": cfg.mode,
        "num_latents": cfg.eval_latents(cfg.num_stages - 1) if cfg.mode != "direct" else 0,
        "checkpoint": latest_checkpoint(out).name if finished else None,
        "markers": list(MARKERS),
        "seed": seed,
        "stages": st["stages"],
        "total_steps": st["global_step"],
        "cpu_time_s": round(st["cpu_s"], 1),
        "wall_time_s": round(st["wall_s"], 1),
        "config": _cfg_dict(cfg),
        "task": {"name": "arithmetic", "module": "interp.data.arithmetic", "steps": cfg.task_steps, "dev_seed": D.DEV_SEED, "test_seed": D.TEST_SEED},
        "torch_threads": torch.get_num_threads(),
    }
    return {"meta": meta, "llama": llama.eval(), "state": st, "finished": finished}


# ---------------------------------------------------------------- measurements


def _thoughts(llama, questions: Sequence[str], K: int, batch: int = 250) -> torch.Tensor:
    return torch.cat([greedy_generate(llama, questions[i : i + batch], K, "coconut", max_new_tokens=1)["thoughts"] for i in range(0, len(questions), batch)])


def _swap(llama, a_questions, a_answers, b_questions, b_answers, K: int) -> dict[str, Any]:
    """Feed A's K thoughts (all of them) into B's prompt, over the pairs whose A the model answers right."""
    a_gen = [greedy_generate(llama, a_questions[i : i + 250], K) for i in range(0, len(a_questions), 250)]
    a_pred = [x for g in a_gen for x in g["answers"]]
    a_th = torch.cat([g["thoughts"] for g in a_gen])
    b_pred = [x for i in range(0, len(b_questions), 250) for x in greedy_generate(llama, b_questions[i : i + 250], K)["answers"]]
    ok = [i for i in range(len(a_questions)) if a_pred[i] == a_answers[i]]
    sw: list[str] = []
    for i in range(0, len(ok), 250):
        idx = ok[i : i + 250]
        sw += greedy_generate(llama, [b_questions[j] for j in idx], K, "coconut", a_th[idx])["answers"]
    differ = [n for n, j in enumerate(ok) if a_answers[j] != b_answers[j]]
    return {
        "pairs": len(a_questions),
        "pairs_A_right": len(ok),
        "A_accuracy": len(ok) / len(a_questions),
        "B_accuracy": sum(b_pred[j] == b_answers[j] for j in range(len(b_questions))) / len(b_questions),
        "gives_A_answer": sum(sw[n] == a_answers[j] for n, j in enumerate(ok)) / max(1, len(ok)),
        "pairs_A_right_answers_differ": len(differ),
        "gives_A_answer_when_answers_differ": sum(sw[n] == a_answers[ok[n]] for n in differ) / max(1, len(differ)),
        "gives_B_answer_when_answers_differ": sum(sw[n] == b_answers[ok[n]] for n in differ) / max(1, len(differ)),
    }


@torch.no_grad()
def measure(
    coconut_dir: str | Path,
    *,
    pause_dir=None,
    direct_dir=None,
    n_test: int = D.TEST_SIZE,
    n_pairs: int = D.PAIRS_SIZE,
    task_steps: int = 6,
    n_roundtrip: int = 100,
    checkpoint: str | None = None,
    num_latents: int | None = None,
) -> dict[str, Any]:
    """Everything the card reports, on the 1,000 test problems (seed `D.TEST_SEED`) and the 1,000 swap pairs.

    checkpoint / num_latents: measure another `checkpoint_N` of the run (e.g. a stage end) with that many thoughts."""
    t0 = time.process_time()
    ck = Path(coconut_dir) / checkpoint if checkpoint else latest_checkpoint(coconut_dir)
    llama = load_coconut_hf(coconut_dir, ck.name)
    meta = json.loads((Path(coconut_dir) / "run.json").read_text()) if (Path(coconut_dir) / "run.json").exists() else {"num_latents": 6}
    K = meta["num_latents"] if num_latents is None else num_latents
    test = D.test_problems(task_steps, n_test)
    qs = [p.question for p in test]
    res: dict[str, Any] = {"n_test": len(test), "test_seed": D.TEST_SEED, "num_latents": K, "checkpoint": ck.name}
    acc, answers = answer_accuracy(llama, test, K, "coconut")
    res["accuracy"] = acc
    thoughts = _thoughts(llama, qs, K)
    res["accuracy_zero_thoughts"] = answer_accuracy(llama, test, K, "coconut", thoughts_override=torch.zeros_like(thoughts))[0]
    mean = thoughts.mean(0, keepdim=True).expand_as(thoughts).contiguous()
    res["accuracy_mean_thoughts"] = answer_accuracy(llama, test, K, "coconut", thoughts_override=mean)[0]
    res["accuracy_by_num_thoughts"] = {k: answer_accuracy(llama, test, k, "coconut")[0] for k in range(K + 1)}
    res["thought_norm_mean"] = thoughts.norm(dim=-1).mean().item()
    res["digit_embedding_norm_mean"] = llama.get_input_embeddings().weight[3:13].norm(dim=-1).mean().item()
    res["readout"] = thought_readout(llama, test, K)
    # swaps: random pairs (A = test[i], B = test[i + 1]) and the minimal pairs (A = clean, B = corrupted)
    nxt = [test[(i + 1) % len(test)] for i in range(len(test))]
    res["swap_random_pairs"] = _swap(llama, qs, [str(p.answer) for p in test], [p.question for p in nxt], [str(p.answer) for p in nxt], K)
    pairs = D.swap_pairs(task_steps, n_pairs)
    a_ans = [str(int(p.clean_answer)) for p in pairs]
    b_ans = [str(int(p.corrupted_answer)) for p in pairs]
    res["swap_minimal_pairs"] = _swap(llama, [p.clean_question for p in pairs], a_ans, [p.corrupted_question for p in pairs], b_ans, K)
    # the loader round trip: interp.load_coconut(...).generate == this module's greedy decoding
    import interp

    model = interp.load_coconut(ck, Path(coconut_dir) / "base", num_latents=K, device="cpu")
    same_ids = same_ans = 0
    dmax = 0.0
    mine = greedy_generate(llama, qs[:n_roundtrip], K, max_new_tokens=24)
    for i, q in enumerate(qs[:n_roundtrip]):
        g = model.generate(q, max_new_tokens=24)
        ids = g.answer_ids.tolist()
        ids = ids[:-1] if ids and ids[-1] == EOS_ID else ids
        same_ids += ids == mine["ids"][i]
        theirs = "" if g.answer is None else (str(int(g.answer)) if isinstance(g.answer, float) and g.answer.is_integer() else str(g.answer))
        same_ans += theirs == mine["answers"][i]
        dmax = max(dmax, (g.latents - mine["thoughts"][i]).abs().max().item())
    res["load_coconut_roundtrip"] = {"questions": n_roundtrip, "same_tokens": same_ids, "same_answer": same_ans, "max_abs_thought_diff": dmax}
    if pause_dir is not None:
        pm = json.loads((Path(pause_dir) / "run.json").read_text()) if (Path(pause_dir) / "run.json").exists() else None
        pl = load_plain(pause_dir)
        reached = pm["stages"][-1]["stage"] if pm and pm["stages"] else None
        ks = sorted({0, K} | ({min(reached, K)} if reached is not None else set()))
        res["pause"] = {
            "checkpoint": latest_checkpoint(pause_dir).name,
            "accuracy": answer_accuracy(pl, test, K, "pause")[0],
            "accuracy_by_num_pauses": {k: answer_accuracy(pl, test, k, "pause")[0] for k in ks},
            "last_stage_trained": reached,
            "total_steps": pm["total_steps"] if pm else None,
            "stopped": pm.get("stopped", False) if pm else None,
        }
    if direct_dir is not None:
        dm = json.loads((Path(direct_dir) / "run.json").read_text()) if (Path(direct_dir) / "run.json").exists() else None
        _, d_ans = answer_accuracy(load_plain(direct_dir), test, 0, "direct")
        res["direct"] = {
            "checkpoint": latest_checkpoint(direct_dir).name,
            "accuracy": sum(a == str(p.answer) for a, p in zip(d_ans, test)) / len(test),
            "distinct_answers": len(set(d_ans)),
            "total_steps": dm["total_steps"] if dm else None,
            "stopped": dm.get("stopped", False) if dm else None,
        }
    res["measure_cpu_s"] = round(time.process_time() - t0, 1)
    return res


@torch.no_grad()
def thought_readout(llama, problems, K: int) -> dict[str, Any]:
    """Per latent t: fraction of problems whose thought t, unembedded through the tied embedding, has the
    intermediate value v_t as its top digit token (thought t is computed at the position before latent t)."""
    out = _thoughts(llama, [p.question for p in problems], K)
    W = llama.get_output_embeddings().weight  # thoughts are final-normed already: their logits are out @ W.T
    digits = [COCONUT_VOCAB.index(str(i)) for i in range(10)]
    top_all = (out @ W.T).argmax(-1)
    top = (out @ W[digits].T).argmax(-1)  # [B, K], the digit value
    vals = torch.tensor([p.values[:K] for p in problems])
    nxt = torch.tensor([p.values[1 : K + 1] + [-1] * (K + 1 - len(p.values)) for p in problems])
    names = [COCONUT_VOCAB[i] if i < CV else MARKERS[i - CV] for i in range(W.shape[0])]
    return {
        "top_digit_eq_v_t": [(top[:, t] == vals[:, t]).float().mean().item() for t in range(K)],
        "top_digit_eq_v_t+1": [(top[:, t] == nxt[:, t]).float().mean().item() for t in range(K)],
        "top_token_counts": [dict(sorted(((names[i], int((top_all[:, t] == i).sum())) for i in top_all[:, t].unique().tolist()), key=lambda x: -x[1])[:4]) for t in range(K)],
    }


OBJECTIVES = ("coconut", "pause", "direct")


def cli_train_coconut(objective: str, out: str | Path, preset: str = "embedded", seed: int = 0, resume: bool = False) -> int:
    """`interp train --objective coconut|pause|direct --preset NAME --out DIR [--seed S] [--resume]`:
    the Coconut curriculum (or its pause / no-CoT control of the preset), written in the official format."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    cfg = get_preset(preset)
    if objective != "coconut":
        cfg = control_config(cfg, objective)
    r = train_coconut(cfg, out, seed=seed, resume=resume)
    m = r["meta"]
    print(f"wrote {Path(out) / m['checkpoint']} ({objective}, {m['total_steps']} steps, {m['cpu_time_s']} CPU s, stages {[(s['stage'], s['steps'], s['dev_acc']) for s in m['stages']]})")
    return 0


__all__ = [
    "OBJECTIVES",
    "cli_train_coconut",
    "control_config",
    "COCONUT_VOCAB",
    "MARKERS",
    "CoconutConfig",
    "PRESETS",
    "answer_accuracy",
    "build_model",
    "coconut_state_dict",
    "coconut_tokenizer",
    "cot_latent_sample",
    "get_preset",
    "greedy_generate",
    "group_forward",
    "load_coconut_hf",
    "load_plain",
    "measure",
    "question_latent_ids",
    "save_base_dir",
    "thought_readout",
    "ship",
    "finalize_stopped",
    "load_embedded",
    "stage_curve",
    "tokenize_problem",
    "train_coconut",
]


# ---------------------------------------------------------------- shipping


def finalize_stopped(run_dir: str | Path) -> dict[str, Any]:
    """`run.json` for a run stopped (killed) inside its last stage: its last saved step is the model.

    The unfinished stage is recorded with the steps it had done and its last dev evaluation, and
    `"stopped_in_stage": true`; `--resume` would continue it exactly."""
    run_dir = Path(run_dir)
    saved = torch.load(run_dir / "train_state.pt", map_location="cpu", weights_only=False)
    st, c = saved["state"], saved["config"]
    evals = [r for r in stage_curve(run_dir / "train_log.jsonl") if r["global_step"] <= st["global_step"] and r["stage"] == st["stage"]]
    stages = list(st["stages"])
    if not st["done"] and st["step_in_stage"] > 0:
        stages.append(
            {
                "stage": st["stage"],
                "steps": st["step_in_stage"],
                "end_global_step": st["global_step"],
                "dev_acc": evals[-1]["dev_acc"] if evals else None,
                "dev_acc_step": evals[-1]["step"] if evals else None,
                "dev_latents": min(c["max_latent_stage"], st["stage"]) * c["c_thought"] if c["mode"] != "direct" else 0,
                "cpu_s": round(st["cpu_s"], 1),
                "stopped_in_stage": True,
            }
        )
    last_stage = c["max_latent_stage"] if c["mode"] != "direct" else 0
    meta = {
        "family": "coconut" if c["mode"] == "coconut" else f"plain-llama ({c['mode']} control)",
        "mode": c["mode"],
        "num_latents": min(c["max_latent_stage"], c["task_steps"]) * c["c_thought"] if c["mode"] != "direct" else 0,
        "reached_last_stage": st["stage"] >= last_stage,
        "checkpoint": saved["checkpoint"],
        "markers": list(MARKERS),
        "seed": saved["seed"],
        "stages": stages,
        "total_steps": st["global_step"],
        "cpu_time_s": round(st["cpu_s"], 1),
        "wall_time_s": round(st["wall_s"], 1),
        "config": c,
        "task": {"name": "arithmetic", "module": "interp.data.arithmetic", "steps": c["task_steps"], "dev_seed": D.DEV_SEED, "test_seed": D.TEST_SEED},
        "stopped": not st["done"],
        "torch_threads": 1,
    }
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


EMBEDDED_COCONUT_DIR = Path(__file__).resolve().parents[1] / "embedded" / "coconut"


def ship(run_dir: str | Path, dest: str | Path = EMBEDDED_COCONUT_DIR, metrics: dict[str, Any] | None = None, log_every: int = 10) -> Path:
    """Copy a finished run's last `checkpoint_N`, `base/`, `run.json` (+ `metrics.json`) and a thinned
    `train_log.jsonl` (every `log_every`-th step, every evaluation, every stage's last step) to `dest`."""
    import shutil

    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for p in dest.glob("checkpoint_*"):
        p.unlink()
    ck = latest_checkpoint(run_dir)
    shutil.copy2(ck, dest / ck.name)
    if (dest / "base").exists():
        shutil.rmtree(dest / "base")
    shutil.copytree(run_dir / "base", dest / "base")
    meta = json.loads((run_dir / "run.json").read_text())
    (dest / "coconut.json").write_text(json.dumps(meta, indent=2) + "\n")
    ends = {s["end_global_step"] for s in meta["stages"]}
    lines = [ln for ln in (run_dir / "train_log.jsonl").read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if (r := json.loads(ln))["global_step"] % log_every == 0 or "dev_acc" in r or r["global_step"] in ends or r["global_step"] == 1]
    (dest / "train_log.jsonl").write_text("".join(ln + "\n" for ln in kept))
    if metrics is not None:
        (dest / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return dest


def load_embedded(*, num_latents: int | None = None, device: str = "cpu"):
    """The shipped Coconut model (`interp/embedded/coconut/`) through `interp.load_coconut`."""
    import interp

    meta = json.loads((EMBEDDED_COCONUT_DIR / "coconut.json").read_text())
    k = meta["num_latents"] if num_latents is None else num_latents
    return interp.load_coconut(EMBEDDED_COCONUT_DIR, EMBEDDED_COCONUT_DIR / "base", num_latents=k, device=device)


def stage_curve(log_path: str | Path) -> list[dict[str, Any]]:
    """The dev evaluations of a run's train_log.jsonl: [{global_step, stage, step, dev_acc, loss, cpu_s}]."""
    out = []
    for ln in Path(log_path).read_text().splitlines():
        if ln.strip() and "dev_acc" in (r := json.loads(ln)):
            out.append({k: r[k] for k in ("global_step", "stage", "step", "dev_acc", "loss", "cpu_s") if k in r})
    return out


def cli_measure(model_dir: str | Path, out_json: str | Path | None = None, pause_dir=None, direct_dir=None) -> dict[str, Any]:
    """`measure` and write it as JSON (the card's numbers)."""
    m = measure(model_dir, pause_dir=pause_dir, direct_dir=direct_dir)
    if out_json is not None:
        Path(out_json).write_text(json.dumps(m, indent=2) + "\n")
    return m


if __name__ == "__main__":  # python -m interp.train.coconut train|measure ...
    import argparse

    ap = argparse.ArgumentParser(prog="python -m interp.train.coconut")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--objective", choices=OBJECTIVES, default="coconut")
    t.add_argument("--preset", default="embedded", choices=sorted(PRESETS))
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    m = sub.add_parser("measure")
    m.add_argument("model_dir")
    m.add_argument("--pause")
    m.add_argument("--direct")
    m.add_argument("--json")
    a = ap.parse_args()
    if a.cmd == "train":
        raise SystemExit(cli_train_coconut(a.objective, a.out, a.preset, a.seed, a.resume))
    print(json.dumps(cli_measure(a.model_dir, a.json, a.pause, a.direct), indent=2))
