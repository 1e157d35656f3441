"""Held-out evaluation of the embedded model, in plain PyTorch, following the official CODI loop.

    python -m interp.train.evaluate --model interp/embedded --direct DIR_OF_DIRECT_BASELINE

measures on 1,000 held-out problems (seed disjoint from training, questions excluded from
training): student accuracy; zeroed and mean latents; the teacher decoding its written chain;
the direct-answer baseline; latent swap on clean/corrupted pairs; and the logit lens on each
latent. It writes `metrics.json` beside the model and the model card `docs/embedded_model.md`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from interp.family import last_number as extract_answer
from interp.train import data as D
from interp.train.modeling import cache_kwargs, load_checkpoint
from interp.train.tokenizer import EOT_ID

MAX_NEW_TOKENS = 16


@dataclass
class StudentGeneration:
    text: str  # decoded generated tokens (special tokens skipped)
    answer: float | None  # last number in `text`
    answer_ids: list[int]  # greedy tokens generated after <eot>, up to and including </s> when produced
    latents: torch.Tensor  # [K, d] the latent embeddings fed after <bot>
    latent_finals: torch.Tensor  # [K, d] final-normed (HF hidden_states[-1]) state at each latent position
    bot_final: torch.Tensor = field(repr=False, default=None)  # [d] final-normed state at <bot>


def _special_ids(llama) -> tuple[int, int, int]:
    v = llama.config.vocab_size - 3  # the checkpoint holds V + 3 rows
    return v, v + 1, v + 2  # pad, bot, eot


@torch.no_grad()
def student_generate(llama, prj, tokenizer, question: str, num_latents: int = 6, latents_override=None, max_new_tokens: int = MAX_NEW_TOKENS) -> StudentGeneration:
    """The official CODI inference loop, batch 1, with a KV cache.

    ids = tokenizer(question) + [bot]; latent 1 = prj(hidden_states[-1] at the last position);
    `num_latents` latent embeddings are fed one at a time (the projection after the last is not fed);
    then <eot>; then greedy decoding over logits[..., :eot] until </s> or `max_new_tokens`.
    `latents_override`: None; a [K, d] tensor replacing every fed latent; or a dict {t (0-based): [d]}
    replacing only latent t (the later ones are recomputed through the loop from the patched run).
    """
    _, bot, eot = _special_ids(llama)
    eos = tokenizer.eos_token_id
    dev = next(llama.parameters()).device
    ids = torch.tensor([tokenizer(question)["input_ids"] + [bot]], device=dev)
    out = llama(input_ids=ids, use_cache=True, output_hidden_states=True)
    cache = out.past_key_values
    bot_final = out.hidden_states[-1][0, -1]
    h = out.hidden_states[-1][:, -1]
    fed, finals = [], []
    for t in range(num_latents):
        lat = prj(h)
        if latents_override is not None:
            ov = latents_override.get(t) if isinstance(latents_override, dict) else latents_override[t]
            if ov is not None:
                lat = ov.reshape(1, -1).to(device=dev, dtype=lat.dtype)
        fed.append(lat[0])
        out = llama(inputs_embeds=lat[:, None], use_cache=True, output_hidden_states=True, **cache_kwargs(llama, cache))
        cache = out.past_key_values
        h = out.hidden_states[-1][:, -1]
        finals.append(h[0])
    out = llama(input_ids=torch.tensor([[eot]], device=dev), use_cache=True, **cache_kwargs(llama, cache))
    cache = out.past_key_values
    gen: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1, :eot].argmax())
        gen.append(nxt)
        if nxt == eos:
            break
        out = llama(input_ids=torch.tensor([[nxt]], device=dev), use_cache=True, **cache_kwargs(llama, cache))
        cache = out.past_key_values
    text = tokenizer.decode(gen, skip_special_tokens=True)
    d = llama.config.hidden_size
    stack = lambda xs: torch.stack(xs) if xs else torch.zeros(0, d)  # noqa: E731
    return StudentGeneration(text, extract_answer(text), gen, stack(fed), stack(finals), bot_final)


@torch.no_grad()
def greedy_generate(llama, prompt_ids: list[int], eos_id: int, max_new_tokens: int = 32, restrict: int | None = None) -> list[int]:
    """Plain greedy decoding (KV cache) from token ids; `restrict` keeps logits[..., :restrict]."""
    dev = next(llama.parameters()).device
    out = llama(input_ids=torch.tensor([prompt_ids], device=dev), use_cache=True)
    cache, gen = out.past_key_values, []
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1]
        nxt = int((logits[:restrict] if restrict else logits).argmax())
        gen.append(nxt)
        if nxt == eos_id:
            break
        out = llama(input_ids=torch.tensor([[nxt]], device=dev), use_cache=True, **cache_kwargs(llama, cache))
        cache = out.past_key_values
    return gen


def _token_names(tokenizer, llama) -> list[str]:
    v = llama.config.vocab_size - 3
    names = [tokenizer.convert_ids_to_tokens(i) for i in range(v)]
    return names + ["<pad>", "<bot>", "<eot>"]


def teacher_generate(llama, tokenizer, question: str) -> dict[str, Any]:
    """Teacher mode: greedy decoding of the written chain from `<s> question <bot>`."""
    _, bot, eot = _special_ids(llama)
    gen = greedy_generate(llama, tokenizer(question)["input_ids"] + [bot], tokenizer.eos_token_id, 32)
    names = _token_names(tokenizer, llama)
    chain, after = (gen[: gen.index(eot)], gen[gen.index(eot) + 1 :]) if eot in gen else (gen, [])
    chain_text = " ".join(names[i] for i in chain)
    answer_text = tokenizer.decode(after, skip_special_tokens=True)
    return {"chain": chain_text, "text": answer_text, "answer": extract_answer(answer_text)}


def direct_generate(llama, tokenizer, question: str) -> dict[str, Any]:
    gen = greedy_generate(llama, tokenizer(question)["input_ids"], tokenizer.eos_token_id, MAX_NEW_TOKENS)
    text = tokenizer.decode(gen, skip_special_tokens=True)
    return {"text": text, "answer": extract_answer(text)}


def _frac(xs) -> float:
    xs = list(xs)
    return round(sum(xs) / len(xs), 4) if xs else float("nan")


def evaluate_model(model_dir: str | Path, direct_dir: str | Path | None = None, n: int = D.TEST_SIZE, n_pairs: int = D.PAIRS_SIZE, progress: bool = True) -> dict[str, Any]:
    """All the held-out numbers of the model card (see the module docstring)."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "codi.json").read_text())
    K, steps = meta["num_latents"], meta["task"]["steps"]
    tok = AutoTokenizer.from_pretrained(model_dir / "base")
    llama, prj = load_checkpoint(model_dir / "model.safetensors", model_dir / "base")
    problems = D.test_problems(steps, n)
    t0 = time.time()
    bar = lambda it, desc: tqdm(it, desc=desc, disable=not progress, mininterval=5.0)  # noqa: E731

    gens = [student_generate(llama, prj, tok, p.question, K) for p in bar(problems, "student")]
    student_ok = [g.answer == p.answer for g, p in zip(gens, problems)]
    latents = torch.stack([g.latents for g in gens])  # [n, K, d]
    finals = torch.stack([g.latent_finals for g in gens])
    zero = torch.zeros_like(latents[0])
    mean = latents.mean(0)
    zero_ok = [student_generate(llama, prj, tok, p.question, K, zero).answer == p.answer for p in bar(problems, "zeroed")]
    mean_ok = [student_generate(llama, prj, tok, p.question, K, mean).answer == p.answer for p in bar(problems, "mean")]
    # how often the zeroed / mean runs give the same (constant) answer: chance is 10%
    teach = [teacher_generate(llama, tok, p.question) for p in bar(problems, "teacher")]
    teacher_ok = [t["answer"] == p.answer for t, p in zip(teach, problems)]
    chain_ok = [t["chain"] == p.chain_of_thought for t, p in zip(teach, problems)]

    # logit lens: unembedding (tied) of latent t's final-normed state, and of the fed embedding L_t
    W = llama.get_output_embeddings().weight  # [V+3, d]
    digit_id = {v: tok.convert_tokens_to_ids(str(v)) for v in range(10)}
    top_final = (finals @ W.T).argmax(-1)  # [n, K]
    top_embed = (latents @ W.T).argmax(-1)
    lens: dict[str, list] = {"final_state_eq_v_t": [], "final_state_eq_v_t+1": [], "embedding_eq_v_t": [], "embedding_eq_v_t+1": []}
    for t in range(K):
        v_t = torch.tensor([digit_id[p.values[t]] for p in problems])
        lens["final_state_eq_v_t"].append(_frac((top_final[:, t] == v_t).tolist()))
        lens["embedding_eq_v_t"].append(_frac((top_embed[:, t] == v_t).tolist()))
        if t + 1 < len(problems[0].values):
            v_n = torch.tensor([digit_id[p.values[t + 1]] for p in problems])
            lens["final_state_eq_v_t+1"].append(_frac((top_final[:, t] == v_n).tolist()))
            lens["embedding_eq_v_t+1"].append(_frac((top_embed[:, t] == v_n).tolist()))
        else:
            lens["final_state_eq_v_t+1"].append(None)
            lens["embedding_eq_v_t+1"].append(None)
    names = _token_names(tok, llama)
    lens["final_state_top_tokens_last_latent"] = _top_counts(top_final[:, -1], names)

    # latent swap: the clean problem's K latents fed into the corrupted question's prompt
    pairs = D.swap_pairs(steps, n_pairs)
    swap_clean, swap_corr, clean_ok, corr_ok = [], [], [], []
    for pair in bar(pairs, "swap"):
        c = student_generate(llama, prj, tok, pair.clean_question, K)
        x = student_generate(llama, prj, tok, pair.corrupted_question, K)
        s = student_generate(llama, prj, tok, pair.corrupted_question, K, c.latents)
        clean_ok.append(c.answer == pair.clean_answer)
        corr_ok.append(x.answer == pair.corrupted_answer)
        swap_clean.append(s.answer == pair.clean_answer)
        swap_corr.append(s.answer == pair.corrupted_answer)

    metrics: dict[str, Any] = {
        "n_test": len(problems),
        "n_pairs": len(pairs),
        "test_seed": D.TEST_SEED,
        "pairs_seed": D.PAIRS_SEED,
        "student_accuracy": _frac(student_ok),
        "zeroed_latents_accuracy": _frac(zero_ok),
        "mean_latents_accuracy": _frac(mean_ok),
        "teacher_accuracy": _frac(teacher_ok),
        "teacher_chain_exact": _frac(chain_ok),
        "swap": {
            "clean_answer_rate": _frac(swap_clean),
            "corrupted_answer_rate": _frac(swap_corr),
            "student_clean_accuracy": _frac(clean_ok),
            "student_corrupted_accuracy": _frac(corr_ok),
        },
        "logit_lens": lens,
        "direct_baseline_accuracy": None,
        "eval_wall_s": None,
    }
    if direct_dir is not None:
        metrics.update(evaluate_direct(direct_dir, steps, n, progress))
    metrics["eval_wall_s"] = round(time.time() - t0, 1)
    return metrics


def evaluate_direct(direct_dir: str | Path, steps: int = 6, n: int = D.TEST_SIZE, progress: bool = True) -> dict[str, Any]:
    """Accuracy of a direct-answer baseline checkpoint on the same held-out problems."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    direct_dir = Path(direct_dir)
    tok = AutoTokenizer.from_pretrained(direct_dir / "base")
    d_llama, _ = load_checkpoint(direct_dir / "model.safetensors", direct_dir / "base")
    d_meta = json.loads((direct_dir / "codi.json").read_text())
    problems = D.test_problems(steps, n)
    answers = [direct_generate(d_llama, tok, p.question)["answer"] for p in tqdm(problems, desc="direct", disable=not progress, mininterval=5.0)]
    return {
        "direct_baseline_accuracy": _frac(a == p.answer for a, p in zip(answers, problems)),
        "direct_baseline_most_common_answer_rate": _frac(a == max(set(answers), key=answers.count) for a in answers),
        "direct_baseline_steps": d_meta["steps"]["total"],
        "direct_baseline_wall_s": d_meta["wall_time_s"],
        "direct_baseline_cpu_s": d_meta.get("cpu_time_s"),
    }


def _top_counts(ids: torch.Tensor, names: list[str]) -> dict[str, int]:
    vals, counts = ids.unique(return_counts=True)
    order = counts.argsort(descending=True)
    return {names[int(vals[i])]: int(counts[i]) for i in order[:5]}


def targets_report(m: dict[str, Any]) -> dict[str, bool | None]:
    s = m["student_accuracy"]
    d = m.get("direct_baseline_accuracy")
    return {
        "student >= 0.90": s >= 0.90,
        "zeroed latents <= 0.30": m["zeroed_latents_accuracy"] <= 0.30,
        "mean latents <= 0.30": m["mean_latents_accuracy"] <= 0.30,
        "direct baseline <= student - 0.20": None if d is None else d <= s - 0.20,
        "swap clean-answer rate >= 0.80": m["swap"]["clean_answer_rate"] >= 0.80,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "embedded"))
    ap.add_argument("--direct", default=None, help="directory of a direct-baseline checkpoint")
    ap.add_argument("--card", default=None, help="write the model card here (docs/embedded_model.md)")
    ap.add_argument("--n", type=int, default=D.TEST_SIZE)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--direct-only", action="store_true", help="add the direct baseline to an existing metrics.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.direct_only:
        m = json.loads((Path(args.model) / "metrics.json").read_text())
        steps = json.loads((Path(args.model) / "codi.json").read_text())["task"]["steps"]
        m.update(evaluate_direct(args.direct, steps, m["n_test"]))
    else:
        m = evaluate_model(args.model, args.direct, n=args.n, n_pairs=args.n)
    m["targets_met"] = targets_report(m)
    (Path(args.model) / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    print(json.dumps(m, indent=2))
    if args.card:
        from interp.train.card import write_model_card

        write_model_card(args.card, json.loads((Path(args.model) / "codi.json").read_text()), m)
    return 0


@torch.no_grad()
def answers_match(llama, prj, questions: list[str], answers: list[int], num_latents: int, latents_override=None, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """(matched [n] bool, latents [n, num_latents, d_model]): whether the greedy answer text after the latents
    (logits < eot) is exactly `The answer is: N </s>` for answers[i] (teacher-forced argmax = greedy, since
    every earlier token must match too), and the latents fed (`latents_override` where given)."""
    from interp.train.modeling import restrict_logits, run_latents

    matched, latents = [], []
    for i in range(0, len(questions), batch):
        p_ids = D.stack([D.prompt_ids(q) for q in questions[i : i + batch]])
        a_ids = D.stack([[EOT_ID] + D.answer_suffix_ids(a) for a in answers[i : i + batch]])
        ov = None if latents_override is None else latents_override[i : i + batch]
        run = run_latents(llama, prj, p_ids, num_latents, latents_override=ov)
        pred = restrict_logits(llama(input_ids=a_ids, **cache_kwargs(llama, run.cache)).logits[:, :-1]).argmax(-1)
        matched.append((pred == a_ids[:, 1:]).all(1))
        latents.append(run.latents)
    return torch.cat(matched), torch.cat(latents)


@torch.no_grad()
def measure_batched(llama, prj, num_latents: int = 6, steps: int = 6, n: int = D.TEST_SIZE, n_pairs: int = D.PAIRS_SIZE) -> dict[str, Any]:
    """The card's headline numbers in batches (seconds, not the minutes of `evaluate_model`): accuracy on the
    test problems, with zeroed and with mean latents, and the swap of all latents of A into B on the pairs."""
    test = D.test_problems(steps, n)
    qs, ans = [p.question for p in test], [p.answer for p in test]
    right, lat = answers_match(llama, prj, qs, ans, num_latents)
    res = {"n_test": n, "test_seed": D.TEST_SEED, "student_accuracy": right.float().mean().item()}
    res["zeroed_latents_accuracy"] = answers_match(llama, prj, qs, ans, num_latents, torch.zeros_like(lat))[0].float().mean().item()
    res["mean_latents_accuracy"] = answers_match(llama, prj, qs, ans, num_latents, lat.mean(0, keepdim=True).expand_as(lat).contiguous())[0].float().mean().item()
    pairs = D.swap_pairs(steps, n_pairs)
    a_q, b_q = [p.clean_question for p in pairs], [p.corrupted_question for p in pairs]
    a_ans, b_ans = [int(p.clean_answer) for p in pairs], [int(p.corrupted_answer) for p in pairs]
    a_right, a_lat = answers_match(llama, prj, a_q, a_ans, num_latents)
    gives_a = answers_match(llama, prj, b_q, a_ans, num_latents, a_lat)[0]
    gives_b = answers_match(llama, prj, b_q, b_ans, num_latents, a_lat)[0]
    keep = a_right & torch.tensor([x != y for x, y in zip(a_ans, b_ans, strict=True)])
    res["swap"] = {
        "pairs": len(pairs),
        "pairs_A_right_answers_differ": int(keep.sum()),
        "clean_answer_rate": gives_a[keep].float().mean().item() if keep.any() else None,
        "corrupted_answer_rate": gives_b[keep].float().mean().item() if keep.any() else None,
    }
    return res


if __name__ == "__main__":
    raise SystemExit(main())
