"""Each analysis against a planted answer or an independent computation (hand-worked or plain torch)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from interp import load_default
from interp.analysis import analyze, attention_rows, collect, knockout_generate
from interp.analysis.activations import Activations, Problem, problems_from_pairs, value_token
from interp.analysis.attention import knockout_hooks, prompt_width
from interp.analysis.lens import lens_logits, lens_rows
from interp.analysis.probes import majority_accuracy, probe_row, split
from interp.data import arithmetic_pairs

QUESTIONS = ["7 +5 *3 -2 *7 +4 -1", "1 -2 *9 +3 +3 -5 *7"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_default("aligned")


# ----------------------------------------------------------------------------- probes


def test_probe_finds_a_planted_feature_and_its_control_does_not():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    x = rng.normal(size=(300, 16))
    x[np.arange(300), 3 + y] += 4.0  # each label written along its own direction
    row = probe_row(x, y.astype(str))
    assert row["accuracy"] >= 0.95
    assert row["control_accuracy"] <= 0.45  # 4 classes: chance is about 0.25
    assert row["selectivity"] == pytest.approx(row["accuracy"] - row["control_accuracy"])
    assert probe_row(rng.normal(size=(300, 16)), y.astype(str))["accuracy"] <= 0.45  # nothing planted: nothing found


def test_split_and_majority_hand_worked():
    train, test = split(10, 0.3, seed=0)
    assert len(test) == 3 and sorted(np.concatenate([train, test]).tolist()) == list(range(10))
    assert (split(10, 0.3, seed=0)[1] == test).all()
    y = np.array(["a", "a", "b", "c", "a", "b"])
    assert majority_accuracy(y, np.array([0, 1, 2, 3]), np.array([4, 5])) == 0.5  # "a" wins training; test holds a, b


# ----------------------------------------------------------------------------- lens


def test_lens_rows_hand_worked():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 1.0, 2.0]])[:, None, None]  # [n=2, layers=1, positions=1, vocab=4]
    rows = lens_rows(logits, [3], ["latent[0]"], {"step[1]": torch.tensor([1, 3]), "answer": torch.tensor([-1, 0])})
    step, answer = rows
    assert (step["layer"], step["position"], step["target"]) == (3, "latent[0]", "step[1]")
    assert step["top1_rate"] == 0.5 and step["mean_rank"] == 1.5  # ranks 1 and 2
    z0, z1 = sum(math.exp(v) for v in (0, 3, 1, 2)), sum(math.exp(v) for v in (5, 0, 1, 2))
    assert step["mean_prob"] == pytest.approx((math.exp(3) / z0 + math.exp(2) / z1) / 2, rel=1e-5)
    assert answer["n"] == 1 and answer["top1_rate"] == 1.0  # only problem 2 has the target


def test_lens_at_the_last_layer_is_the_models_own_logits(model):
    acts = collect(model, [Problem(q, 0.0, ()) for q in QUESTIONS])
    lens = lens_logits(model, acts.resid[:, -1])  # [n, positions, eot]
    for i, q in enumerate(QUESTIONS):
        gen = model.generate(q)
        tokens, embeds = model.sequence(gen.question_ids, gen.latents)
        logits = model.forward(embeds[None]).logits[0, :, : model.eot_id]
        latent = (tokens == -1).nonzero().flatten()
        cols = [int(latent[0]) - 1, *latent.tolist(), int(latent[-1]) + 1, len(tokens) - 1]  # bot, latents, eot, answer
        torch.testing.assert_close(lens[i], logits[cols], rtol=1e-4, atol=1e-4)


def test_value_token_is_the_first_token_of_the_value_as_written(model):
    assert model.tokenizer.decode([value_token(model.tokenizer, 7.0)]) == "7"
    assert model.tokenizer.decode([value_token(model.tokenizer, 12.0)]) == "1"


# ----------------------------------------------------------------------------- attention


def test_attention_is_uniform_when_queries_are_zero(model):
    """W_Q = 0 makes every score 0: a query at position i spreads 1/(i+1) over positions 0..i."""
    flat = load_default("aligned")
    for block in flat.model.blocks:
        block.attn.W_Q.data.zero_()
        block.attn.b_Q.data.zero_()
    acts = collect(flat, [Problem(q, 0.0, ()) for q in ["7 +5", *QUESTIONS]])  # three lengths: left padding
    k = flat.num_latents
    for i, q in enumerate(["7 +5", *QUESTIONS]):
        n_q = len(flat.encode(q))  # question tokens, BOS included; bot at n_q, latent t at n_q + 1 + t
        for t in range(k):
            seen = n_q + 2 + t
            expected = torch.tensor([n_q / seen, 1 / seen] + [1 / seen] * (t + 1) + [0.0] * (k - t - 1) + [0.0, 0.0])
            torch.testing.assert_close(acts.attention[i, :, :, t], expected.expand(flat.cfg.n_layers, flat.cfg.n_heads, -1), rtol=1e-5, atol=1e-6)
        seen = n_q + 1 + k + 1 + len(flat.prefix_ids())  # the answer query: the last prefix token
        expected = torch.tensor([n_q / seen, 1 / seen] + [1 / seen] * k + [1 / seen, len(flat.prefix_ids()) / seen])
        torch.testing.assert_close(acts.attention[i, 0, 0, -1], expected, rtol=1e-5, atol=1e-6)


def test_attention_rows_average_over_problems_and_drop_later_keys():
    att = torch.zeros(2, 1, 1, 2, 5)  # problems, layers, heads, queries (latent[0], answer), keys
    att[0, 0, 0, 0] = torch.tensor([0.5, 0.2, 0.3, 0.0, 0.0])
    att[1, 0, 0, 0] = torch.tensor([0.1, 0.2, 0.7, 0.0, 0.0])
    acts = Activations([], [], [-1, 0], [], torch.zeros(0), ["latent[0]", "answer"], ["question", "bot", "latent[0]", "eot", "prefix"], att)
    rows = {(r["query"], r["key"]): r["weight"] for r in attention_rows(acts)}
    assert rows[("latent[0]", "question")] == pytest.approx(0.3) and rows[("latent[0]", "latent[0]")] == pytest.approx(0.5)
    assert ("latent[0]", "eot") not in rows and ("answer", "prefix") in rows


# ----------------------------------------------------------------------------- knockout


def test_knockout_of_every_earlier_key_leaves_each_latent_a_function_of_itself(model):
    """Latents that attend only to themselves: latent t+1 = prj(final state of latent t run alone)."""
    gens = knockout_generate(model, QUESTIONS, [("latents", "question"), ("latents", "bot"), ("latents", "latents")])
    plain = model.generate_batch(QUESTIONS)
    for gen, ref in zip(gens, plain):
        torch.testing.assert_close(gen.latents[0], ref.latents[0])  # bot is not cut: latent 0 unchanged
        latent = gen.latents[0]
        for t in range(1, model.num_latents):
            latent = model.prj(model.forward(latent[None, None].to(model.device)).final[0, 0]).cpu()
            torch.testing.assert_close(gen.latents[t], latent, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(gen.latents[1:], ref.latents[1:], atol=1e-2)


def test_knockout_pattern_is_the_softmax_without_the_cut_edges(model):
    """In one full pass: the cut keys get weight 0 and the rest renormalize (plain torch softmax)."""
    gen = model.generate(QUESTIONS[0])
    tokens, embeds = model.sequence(gen.question_ids, gen.latents)
    width = prompt_width(model, QUESTIONS[:1])
    got = {}
    model.forward(embeds[None], fwd_hooks=[("blocks.1.attn.hook_attn_scores", lambda a, hook: got.__setitem__("scores", a.clone()))])
    hooks = knockout_hooks([("latent[3]", "question"), ("answer", "latent[5]")], [1], width, model.num_latents)
    model.forward(embeds[None], fwd_hooks=[*hooks, ("blocks.1.attn.hook_pattern", lambda a, hook: got.__setitem__("pattern", a.clone()))])
    scores, pattern = got["scores"][0], got["pattern"][0]  # [head, q, k]
    latent3, latent5, eot = width + 3, width + 5, width + model.num_latents
    expected = scores.clone()
    expected[:, latent3, : width - 1] = float("-inf")
    expected[:, eot:, latent5] = float("-inf")
    torch.testing.assert_close(pattern, expected.softmax(-1), rtol=1e-5, atol=1e-6)
    assert pattern[:, latent3, : width - 1].abs().max() == 0 and pattern[:, latent3, width - 1 :].sum(-1).allclose(torch.ones(4))


# ----------------------------------------------------------------------------- the whole analysis


def test_analyze_writes_every_list_and_resumes(model, tmp_path):
    problems = problems_from_pairs(arithmetic_pairs(12))
    data = analyze(model, problems, tmp_path, quick=True, log=lambda s: None)
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert {"lens", "probes", "attention", "knockout"} <= set(saved) and (tmp_path / "report.html").exists()
    assert set(saved["lens"][0]) >= {"layer", "position", "target", "top1_rate", "mean_rank"}
    assert set(saved["probes"][0]) >= {"layer", "position", "target", "accuracy", "control_accuracy", "majority"}
    assert set(saved["attention"][0]) == {"layer", "head", "query", "key", "weight"}
    assert {r["position"] for r in saved["lens"]} == {"bot", "eot", "answer", *(f"latent[{t}]" for t in range(6))}
    assert {r["target"] for r in saved["lens"]} == {"answer", *(f"step[{k}]" for k in range(1, 7))}
    assert {r["layer"] for r in saved["knockout"]} == {"all"}
    logged = []
    analyze(model, problems, tmp_path, quick=True, log=logged.append)
    assert logged == []  # nothing left to run
    assert data["lens"] == saved["lens"]
    with pytest.raises(ValueError, match=r"holds another experiment, differing in problems\.n \(12 -> 5\)"):
        analyze(model, problems[:5], tmp_path, quick=True, log=lambda s: None)


def test_resuming_with_another_checkpoint_of_the_same_shape_is_refused(model, tmp_path):
    """The run directory's fingerprint holds the model's content: a second checkpoint of the same
    shape (the embedded weights, one tensor changed) may not adopt the first one's results."""
    from interp import load_codi
    from interp.loading import EMBEDDED_DIR, read_state_dict
    from interp.runio import UsageError

    problems = problems_from_pairs(arithmetic_pairs(8))
    analyze(model, problems, tmp_path / "a", quick=True, log=lambda s: None)
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()}
    state = read_state_dict(EMBEDDED_DIR / "model.safetensors")
    state["prj.ln.bias"] = state["prj.ln.bias"] + 0.01
    other_file = tmp_path / "other" / "pytorch_model.bin"
    other_file.parent.mkdir()
    torch.save(state, other_file)
    other = load_codi(other_file, EMBEDDED_DIR / "base", num_latents=model.num_latents, answer_prefix=model.answer_prefix, device="cpu")
    with pytest.raises(UsageError, match=r"holds another experiment, differing in model\.checkpoint"):
        analyze(other, problems, tmp_path / "a", quick=True, log=lambda s: None)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()} == before
    data = analyze(other, problems, tmp_path / "a", quick=True, log=lambda s: None, force_new=True)
    assert data["meta"]["problems"] == len(problems)
