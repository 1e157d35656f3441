"""The Coconut curriculum trainer (interp/train/coconut.py): samples and labels equal the official
`get_cot_latent_dataset` on a hand-worked example, the stage schedule, the multi-pass forward against a
full recompute, the loss falls on the micro preset, the checkpoint loads with `interp.load_coconut` and
generates what the training-side forward generates, and resuming equals an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
import torch.nn.functional as F

from interp.data.arithmetic import ArithmeticProblem
from interp.train import coconut as C
from interp.train import data as D

torch.set_num_threads(1)

# the hand-worked problem: 7 +5 *3 -2 -> 2, 6, 4 (mod 10)
PROBLEM = ArithmeticProblem(7, (("+", 5), ("*", 3), ("-", 2)))
# ids: <s> 0, </s> 1, digit d -> 3 + d, + 13, - 14, * 15, = 16, \n 17, ### 18; markers 19, 20, 21
Q = [0, 10, 13, 8, 15, 6, 14, 5, 17]  # "<s> 7 + 5 * 3 - 2 \n"
S1 = [10, 13, 8, 16, 5, 17]  # "7 +5 = 2\n"
S2 = [5, 15, 6, 16, 9, 17]  # "2 *3 = 6\n"
S3 = [9, 14, 5, 16, 7, 17]  # "6 -2 = 4\n"
ANS = [18, 7, 1]  # "### 4" </s>
START, END, LAT = 19, 20, 21
M = -100


def micro(**kw) -> C.CoconutConfig:
    return C.get_preset("micro", **kw)


def test_tokenizer_and_markers(tmp_path):
    from transformers import AutoTokenizer

    from interp.loading.coconut import with_markers

    assert C.tokenize_problem(PROBLEM) == {"question_tokenized": Q, "steps_tokenized": [S1, S2, S3], "answer_tokenized": ANS}
    assert C.problem_steps(PROBLEM) == ["7 +5 = 2", "2 *3 = 6", "6 -2 = 4"]
    assert C.problem_steps(PROBLEM, "value") == ["2", "6", "4"]
    C.save_base_dir(tmp_path, C.base_config(micro()))
    tok, ids = with_markers(AutoTokenizer.from_pretrained(tmp_path))
    assert ids == {"<|start-latent|>": START, "<|end-latent|>": END, "<|latent|>": LAT}
    assert len(tok) == C.CV + 3 == 22
    # the official get_dataset check: the whole text tokenizes as the concatenated pieces
    complete = PROBLEM.question + "\n" + "\n".join(C.problem_steps(PROBLEM)) + "\n### " + str(PROBLEM.answer)
    assert tok(complete)["input_ids"] + [tok.eos_token_id] == Q + S1 + S2 + S3 + ANS
    assert tok(PROBLEM.question + "\n" + "<|start-latent|><|latent|><|end-latent|>")["input_ids"] == Q + [START, LAT, END]


@pytest.mark.parametrize(
    "stage, kw, tokens, n_cut",
    [
        (0, {}, Q + [START, END] + S1 + S2 + S3 + ANS, 11),
        (1, {}, Q + [START, LAT, END] + S2 + S3 + ANS, 12),
        (2, {}, Q + [START, LAT, LAT, END] + S3 + ANS, 13),
        (3, {}, Q + [START, LAT, LAT, LAT, END] + ANS, 14),
        (4, {}, Q + [START, LAT, LAT, LAT, END] + ANS, 14),  # past max_latent_stage: all steps dropped
        (3, {"max_latent_stage": 2}, Q + [START, LAT, LAT, END] + ANS, 13),
        (3, {"max_latent_stage": 2, "pad_latent_to_max": True}, Q + [START, LAT, LAT, END] + ANS, 13),
        (1, {"c_thought": 2}, Q + [START, LAT, LAT, END] + S2 + S3 + ANS, 13),
        (2, {"no_cot": True, "no_special_marker": True}, Q + ANS, 9),
    ],
)
def test_samples_equal_official_get_cot_latent_dataset(stage, kw, tokens, n_cut):
    kw = {"max_latent_stage": 3, **kw}
    s = C.cot_latent_sample(C.tokenize_problem(PROBLEM), stage, **kw)
    assert s["input_ids"] == tokens
    assert s["labels"] == [M] * n_cut + tokens[n_cut:]  # question, markers, latents masked; the rest is its own label
    assert s["n_latent"] == tokens.count(LAT)


def test_uniform_prob_draws_like_the_official_code():
    sample = C.tokenize_problem(PROBLEM)
    for seed in range(20):
        ref = random.Random(seed)
        stage = ref.choice(list(range(4))) if ref.random() < 0.5 else 1  # the official two calls, in order
        s = C.cot_latent_sample(sample, 1, max_latent_stage=3, uniform_prob=0.5, rng=random.Random(seed))
        assert s["stage"] == stage and s["n_latent"] == min(stage, 3)


def test_stage_schedule_thought_counts_and_optimizer_reset(tmp_path):
    E = 3
    cfg = micro(stage_max_steps=(E,) * 4, uniform_prob=(0.0,) * 4, eval_every=100, warmup_steps=4)
    res = C.train_coconut(cfg, tmp_path, seed=0)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 * E
    for rec in log:  # run.py: scheduled_stage = epoch // epochs_per_stage (one "epoch" = one step here)
        stage = C.official_stage(rec["global_step"] - 1, E)
        assert rec["stage"] == stage
        assert rec["latent_counts"] == {str(min(stage, 3)): cfg.batch_size}
        # the logged lr is the scheduler's next one: the warmup restarts with each stage (optimiser rebuilt)
        assert rec["lr"] == pytest.approx(cfg.stage_lr(stage) * min(1.0, (rec["step"] + 1) / cfg.warmup_steps))
    assert [cfg.eval_latents(s) for s in range(4)] == [0, 1, 2, 3]  # get_question_latent_dataset's k
    assert [s["dev_latents"] for s in res["meta"]["stages"]] == [0, 1, 2, 3]
    assert res["meta"]["num_latents"] == 3
    full = C.CoconutConfig()
    assert [full.eval_latents(s) for s in range(7)] == [0, 1, 2, 3, 4, 5, 6]


def _reference_logits(llama, ids: torch.Tensor) -> torch.Tensor:
    """Full recompute: latent t gets the final-normed state at the position before it, in order."""
    emb = llama.get_input_embeddings()(ids).clone()
    for b in range(ids.shape[0]):
        for p in (ids[b] == LAT).nonzero().flatten().tolist():
            out = llama(inputs_embeds=emb[b : b + 1, :p], output_hidden_states=True)
            emb[b, p] = out.hidden_states[-1][0, -1]
    return llama(inputs_embeds=emb).logits


def test_multipass_forward_and_loss_mask_equal_a_full_recompute():
    torch.manual_seed(0)
    cfg = micro()
    llama = C.build_model(cfg)
    problems = D.test_problems(3, 12)
    samples = C.batch_samples(problems, 1, dataclasses.replace(cfg, uniform_prob=(1.0,) * 4), random.Random(1))
    assert len({s["n_latent"] for s in samples}) > 1  # a mixed batch: several groups
    loss, counts = C.batch_loss(llama, samples, "coconut")
    # the official loss: one CE over the whole (padded) batch, shifted, -100 ignored
    total, n = 0.0, 0
    for s in samples:
        ids, labels = torch.tensor([s["input_ids"]]), torch.tensor([s["labels"]])
        logits = _reference_logits(llama, ids)
        total = total + F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=M, reduction="sum")
        n += int((labels[0, 1:] != M).sum())
    assert loss.item() == pytest.approx((total / n).item(), rel=1e-5)
    assert sum(counts.values()) == len(samples)
    # gradients flow through the fed thoughts (as the official loop: they are not detached)
    ids = torch.tensor([C.cot_latent_sample(C.tokenize_problem(p), 3, max_latent_stage=3)["input_ids"] for p in problems[:2]])
    g = C.group_forward(llama, ids, 3)
    assert g.thoughts.requires_grad and g.thoughts.grad_fn is not None
    (grad,) = torch.autograd.grad(g.logits[:, -1].sum(), g.fed[0])
    assert grad.abs().max() > 0  # the last logits depend on the first thought (directly and through the later ones)


def _first_last_loss(log, stage=0):
    losses = [r["loss"] for r in log if r["stage"] == stage]
    return losses[0], losses[-1]


@pytest.mark.parametrize("mode", ["coconut", "pause", "direct"])
def test_loss_falls_on_micro(tmp_path, mode):
    cfg = micro(stage_max_steps=(15, 2, 2, 2), eval_every=100)
    if mode != "coconut":
        cfg = C.control_config(cfg, mode)
    C.train_coconut(cfg, tmp_path, seed=0)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    first, last = _first_last_loss(log)
    assert last < 0.9 * first


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("coconut_micro")
    res = C.train_coconut(micro(stage_max_steps=(20, 6, 6, 8)), out, seed=0)
    return out, res


def test_checkpoint_is_the_official_format(micro_run):
    out, res = micro_run
    ck = C.latest_checkpoint(out)
    assert ck.name == f"checkpoint_{res['meta']['total_steps']}" == res["meta"]["checkpoint"]
    sd = torch.load(ck, weights_only=True)
    assert set(sd) == {"base_causallm." + k for k in res["llama"].state_dict()} | {"embedding.weight"}
    assert torch.equal(sd["embedding.weight"], sd["base_causallm.model.embed_tokens.weight"])
    assert sd["embedding.weight"].shape[0] == C.CV + 3
    assert json.loads((out / "base" / "config.json").read_text())["vocab_size"] == C.CV  # no markers in the base


def test_load_coconut_generates_what_training_generates(micro_run):
    import interp

    out, res = micro_run
    model = interp.load_coconut(out, out / "base", num_latents=3, device="cpu")
    llama = C.load_coconut_hf(out)
    problems = D.test_problems(3, 6)
    mine = C.greedy_generate(llama, [p.question for p in problems], 3, max_new_tokens=24)
    for i, p in enumerate(problems):
        g = model.generate(p.question, max_new_tokens=24)
        theirs = g.answer_ids.tolist()
        theirs = theirs[:-1] if theirs and theirs[-1] == C.EOS_ID else theirs
        assert theirs == mine["ids"][i]
        assert torch.allclose(g.latents, mine["thoughts"][i], atol=1e-4)
        assert (g.answer is None and mine["answers"][i] == "") or str(int(g.answer)) == mine["answers"][i] or g.answer == mine["answers"][i]


def test_pause_and_direct_controls_load_as_plain_llama(tmp_path):
    cfg = C.control_config(micro(stage_max_steps=(3, 2, 2, 2)), "pause")
    res = C.train_coconut(cfg, tmp_path, seed=0)
    sd = torch.load(C.latest_checkpoint(tmp_path), weights_only=True)
    assert not any(k.startswith("base_causallm.") for k in sd) and "lm_head.weight" in sd
    llama = C.load_plain(tmp_path)
    for k, v in res["llama"].state_dict().items():
        assert torch.equal(llama.state_dict()[k], v)
    # the pause forward feeds the <|latent|> row itself at every thought position
    ids = torch.tensor([C.question_latent_ids(D.test_problems(3, 1)[0].question, 3)])
    assert torch.equal(C.group_forward(llama, ids, 3, "pause").logits, llama(input_ids=ids).logits)


@pytest.mark.parametrize("stop", [7, 8, 15])  # mid-stage (save forced), at a stage end, mid-stage on a save step
def test_resume_equals_an_uninterrupted_run(tmp_path, stop):
    cfg = micro()
    full = C.train_coconut(cfg, tmp_path / "full", seed=3)
    part = C.train_coconut(cfg, tmp_path / "part", seed=3, stop_after_steps=stop)
    assert not part["finished"] and part["state"]["global_step"] == stop
    resumed = C.train_coconut(cfg, tmp_path / "part", seed=3, resume=True)
    a, b = full["llama"].state_dict(), resumed["llama"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = lambda d: [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]  # noqa: E731
    la, lb = log(tmp_path / "full"), log(tmp_path / "part")
    assert [(r["global_step"], r["loss"], r.get("dev_acc")) for r in la] == [(r["global_step"], r["loss"], r.get("dev_acc")) for r in lb]
    assert [(s["stage"], s["steps"], s["dev_acc"]) for s in full["meta"]["stages"]] == [(s["stage"], s["steps"], s["dev_acc"]) for s in resumed["meta"]["stages"]]


def test_resume_refuses_another_config(tmp_path):
    C.train_coconut(micro(), tmp_path, seed=0, stop_after_steps=4)
    with pytest.raises(ValueError, match="another config or seed"):
        C.train_coconut(micro(lr=1e-4), tmp_path, seed=0, resume=True)


def test_plain_codi_micro_preset_loss_falls(tmp_path):
    """The published CODI objective (no per-step alignment term) on the micro preset."""
    from interp.train.presets import train_preset

    res = train_preset("micro-codi", tmp_path, seed=0)
    assert res.meta["objective"]["name"] == "codi" and res.meta["objective"]["published_codi"] is True
    p2 = [r for r in res.log if r["phase"] == "phase2-codi"]
    assert p2 and all("distill_steps" not in r for r in p2)
    assert p2[-1]["student_lm"] < p2[0]["student_lm"]


def test_resume_may_change_only_stages_not_started(tmp_path):
    """Budgets of later stages may change on resume (the result equals a fresh run of the new config)."""
    cfg = micro()
    new = micro(stage_max_steps=(8, 4, 2, 3))
    C.train_coconut(cfg, tmp_path / "a", seed=1, stop_after_steps=10)  # in stage 1
    resumed = C.train_coconut(new, tmp_path / "a", seed=1, resume=True)
    fresh = C.train_coconut(new, tmp_path / "b", seed=1)
    a, b = resumed["llama"].state_dict(), fresh["llama"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    C.train_coconut(cfg, tmp_path / "c", seed=1, stop_after_steps=10)
    with pytest.raises(ValueError, match="another config or seed"):
        C.train_coconut(micro(stage_max_steps=(8, 5, 4, 6)), tmp_path / "c", seed=1, resume=True)  # stage 1 changed


@pytest.mark.skipif(not (C.EMBEDDED_COCONUT_DIR / "stage3" / "checkpoint_2900").exists(), reason="embedded Coconut checkpoints not present")
def test_embedded_coconut_checkpoints_load_and_agree_with_training_side():
    import interp

    problems = D.test_problems(6, 8)
    for sub, k in (("", 6), ("stage3", 3)):
        d = C.EMBEDDED_COCONUT_DIR / sub if sub else C.EMBEDDED_COCONUT_DIR
        model = interp.load_coconut(d, d / "base", num_latents=k, device="cpu")
        mine = C.greedy_generate(C.load_coconut_hf(d), [p.question for p in problems], k, max_new_tokens=32)
        for i, p in enumerate(problems):
            ids = model.generate(p.question, max_new_tokens=32).answer_ids.tolist()
            assert ids[:-1] == mine["ids"][i] and ids[-1] == C.EOS_ID
    stage3 = interp.load_coconut(C.EMBEDDED_COCONUT_DIR / "stage3", C.EMBEDDED_COCONUT_DIR / "stage3" / "base", num_latents=3, device="cpu")
    assert stage3.generate("7 +5 *3 -2 *7 +4 -1").answer == 1.0


def test_interp_train_takes_an_objective(tmp_path, capsys):
    """`interp train --objective coconut --preset micro` writes the official checkpoint_N, which load_model reads as Coconut."""
    from interp import load_model
    from interp.cli import main

    main(["train", "--objective", "coconut", "--preset", "micro", "--out", str(tmp_path / "c")])
    assert "wrote " in capsys.readouterr().out
    model = load_model(tmp_path / "c", tmp_path / "c" / "base", device="cpu")
    assert model.family.name == "coconut"
    with pytest.raises(SystemExit) as info:
        main(["train", "--objective", "sideways", "--out", str(tmp_path / "x")])
    assert info.value.code == 2 and "--objective sideways: accepted: aligned, codi, coconut, pause, direct" in capsys.readouterr().err
