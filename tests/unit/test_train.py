"""interp.train: tokenizer, micro training run, checkpoint format, and the student inference loop."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from interp.train import data as D
from interp.train import train_preset
from interp.train.evaluate import extract_answer, student_generate
from interp.train.modeling import build_llama, build_prj, load_checkpoint
from interp.train.tokenizer import hf_tokenizer, llama_config


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    return train_preset("micro", out, seed=0)


@pytest.fixture(scope="module")
def tok():
    return hf_tokenizer()


# ------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("7 +5 *3", ["7", "+", "5", "*", "3"]),
        ("The answer is: 4", ["The", "answer", "is", ":", "4"]),
        ("7 +5 *3 -2 *7 +4 -1", ["7", "+", "5", "*", "3", "-", "2", "*", "7", "+", "4", "-", "1"]),
        ("12", ["1", "2"]),
        ("  9   -3 ", ["9", "-", "3"]),
    ],
)
def test_tokenizer_splits_and_prepends_bos(tok, text, tokens):
    ids = tok(text)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<s>"] + tokens
    assert ids[0] == 0 == tok.bos_token_id


def test_tokenizer_vocab_and_decode(tok):
    vocab = ["<s>", "</s>", "<unk>"] + [str(i) for i in range(10)] + ["+", "-", "*", ":", "The", "answer", "is"]
    assert [tok.convert_ids_to_tokens(i) for i in range(20)] == vocab
    assert len(tok) == 20
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert tok.convert_ids_to_tokens(tok("x")["input_ids"]) == ["<s>", "<unk>"]
    ids = tok("The answer is: 4")["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "The answer is : 4"
    assert extract_answer(tok.decode(ids, skip_special_tokens=True)) == 4.0


def test_sequences_layout():
    p = D.dev_problems(6, 1)[0]
    names = hf_tokenizer().convert_ids_to_tokens
    t = D.teacher_ids(p)
    bot = len(D.prompt_ids(p.question)) - 1
    assert t[bot] == 21 and t[bot + 7] == 22 and t[-1] == 1
    assert names(t[bot + 1 : bot + 7]) == [str(v) for v in p.values]
    assert names(t[bot + 8 :]) == ["The", "answer", "is", ":", str(p.answer), "</s>"]
    assert D.student_answer_ids(p) == t[bot + 7 :]
    assert names(D.direct_ids(p)) == names(t[:bot]) + ["The", "answer", "is", ":", str(p.answer), "</s>"]


def test_training_batches_exclude_heldout():
    held = D.heldout_questions(6)
    assert {p.question for p in D.test_problems()} <= held and {p.question for p in D.dev_problems()} <= held
    for step in range(3):
        assert not {p.question for p in D.train_batch(step, 64)} & held


# ------------------------------------------------------------------ micro training + checkpoint


def test_micro_loss_falls(micro_run):
    for phase in ("phase1-teacher", "phase2-codi"):
        losses = [r["loss"] for r in micro_run.log if r["phase"] == phase]
        assert len(losses) >= 10
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.85 * first, (phase, first, last)
    p2 = [r for r in micro_run.log if r["phase"] == "phase2-codi"]
    assert all({"teacher_lm", "student_lm", "distill", "distill_share"} <= set(r) for r in p2)


def _expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Written independently of interp.train.modeling: HF Llama parameter shapes, V + 3 rows, no lm_head."""
    d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    q, kv, m = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    exp = {"codi.model.embed_tokens.weight": (cfg.vocab_size + 3, d), "codi.model.norm.weight": (d,)}
    for i in range(cfg.num_hidden_layers):
        layer = {
            "self_attn.q_proj.weight": (q, d),
            "self_attn.k_proj.weight": (kv, d),
            "self_attn.v_proj.weight": (kv, d),
            "self_attn.o_proj.weight": (d, q),
            "mlp.gate_proj.weight": (m, d),
            "mlp.up_proj.weight": (m, d),
            "mlp.down_proj.weight": (d, m),
            "input_layernorm.weight": (d,),
            "post_attention_layernorm.weight": (d,),
        }
        exp.update({f"codi.model.layers.{i}.{k}": v for k, v in layer.items()})
    for name in ("1", "3"):
        exp[f"prj.{name}.weight"], exp[f"prj.{name}.bias"] = (d, d), (d,)
    exp["prj.ln.weight"], exp["prj.ln.bias"] = (d,), (d,)
    return exp


def test_checkpoint_format(micro_run):
    from transformers import AutoConfig, AutoTokenizer

    out = micro_run.out_dir
    assert sorted(p.name for p in (out / "base").iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    cfg = AutoConfig.from_pretrained(out / "base")
    assert cfg.vocab_size == 20 and cfg.tie_word_embeddings and (cfg.bos_token_id, cfg.eos_token_id) == (0, 1)
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (2, 32)
    sd = load_file(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in sd.items()} == _expected_shapes(cfg)
    assert not any("lm_head" in k or "lora" in k for k in sd)
    meta = json.loads((out / "codi.json").read_text())
    assert meta["num_latents"] == 3 and meta["answer_prefix"] == "The answer is:" and meta["lora_alpha"] is None
    assert {"objective", "task", "seed", "steps"} <= set(meta)
    tok = AutoTokenizer.from_pretrained(out / "base")
    assert tok("7 +5")["input_ids"] == [0, 10, 13, 8]


def test_checkpoint_reloads_identically(micro_run, tok):
    llama, prj = load_checkpoint(micro_run.out_dir / "model.safetensors", micro_run.out_dir / "base")
    q = D.dev_problems(3, 1)[0].question
    a = student_generate(micro_run.llama.eval(), micro_run.prj.eval(), tok, q, 3)
    b = student_generate(llama, prj, tok, q, 3)
    assert a.answer_ids == b.answer_ids
    torch.testing.assert_close(a.latents, b.latents, atol=1e-6, rtol=0)
    bad = load_file(str(micro_run.out_dir / "model.safetensors"))
    bad.pop("prj.ln.bias")
    from safetensors.torch import save_file

    save_file(bad, str(micro_run.out_dir / "bad.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(micro_run.out_dir / "bad.safetensors", micro_run.out_dir / "base")


# ------------------------------------------------------------------ student_generate vs full recompute


def _full_recompute(llama, prj, tok, question, K, override=None, max_new=16):
    """Independent reference: no KV cache, the whole embedding sequence is re-run at every step."""
    V = llama.config.vocab_size - 3
    bot, eot, eos = V + 1, V + 2, tok.eos_token_id
    emb = llama.get_input_embeddings()
    seq = emb(torch.tensor([tok(question)["input_ids"] + [bot]]))  # [1, T, d]

    def last_final(s):
        return llama(inputs_embeds=s, output_hidden_states=True, use_cache=False).hidden_states[-1][:, -1]

    fed = []
    for t in range(K):
        lat = prj(last_final(seq))
        if override is not None:
            lat = override[t][None]
        fed.append(lat[0])
        seq = torch.cat([seq, lat[:, None]], 1)
    seq = torch.cat([seq, emb(torch.tensor([[eot]]))], 1)
    gen = []
    for _ in range(max_new):
        logits = llama(inputs_embeds=seq, use_cache=False).logits[0, -1]
        nxt = int(logits[:eot].argmax())
        gen.append(nxt)
        if nxt == eos:
            break
        seq = torch.cat([seq, emb(torch.tensor([[nxt]]))], 1)
    return gen, torch.stack(fed)


@torch.no_grad()
def test_student_generate_matches_full_recompute(tok):
    torch.manual_seed(1)
    cfg = llama_config(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=48)
    llama, prj = build_llama(cfg).eval(), build_prj(32).eval()
    with torch.no_grad():  # make </s> reachable so both stopping paths get exercised
        llama.get_input_embeddings().weight.mul_(20)
    for q in ["7 +5 *3 -2 *7 +4 -1", "3 -4 *9", "0 +1 +1 +1 +1 +1 +1"]:
        g = student_generate(llama, prj, tok, q, num_latents=6)
        ref_ids, ref_lat = _full_recompute(llama, prj, tok, q, 6)
        assert g.answer_ids == ref_ids
        torch.testing.assert_close(g.latents, ref_lat, atol=1e-5, rtol=1e-5)
        assert g.text == tok.decode(ref_ids, skip_special_tokens=True)
        override = torch.randn(6, 32)
        g2 = student_generate(llama, prj, tok, q, 6, latents_override=override)
        ref2, _ = _full_recompute(llama, prj, tok, q, 6, override=override)
        assert g2.answer_ids == ref2
        torch.testing.assert_close(g2.latents, override)


# ------------------------------------------------------------------ plain CODI with a curriculum over chain length


def test_codi_curriculum_trains_each_stage_on_its_chain_length(tmp_path, monkeypatch):
    """Stage i of `p2_curriculum` draws its batches at that chain length, from the global step after the
    earlier stages, and evaluates on a dev set of that length."""
    from interp.train import trainer
    from interp.train.presets import get_preset, train_preset

    calls = []
    real = D.train_batch
    monkeypatch.setattr(trainer.D, "train_batch", lambda step, n, steps=6, seed=0: calls.append((step, steps)) or real(step, n, steps, seed))
    res = train_preset("micro-codi-curriculum", tmp_path, seed=0)
    cfg = get_preset("micro-codi-curriculum")
    n1 = res.meta["steps"]["phase1"]
    p2 = [c for c in calls if c[0] >= n1]
    assert p2 == [(n1 + i, 2) for i in range(6)] + [(n1 + 6 + i, 3) for i in range(6)]
    assert [s["length"] for s in res.meta["dev"]["phase2_stages"]] == list(cfg.p2_curriculum) == [2, 3]
    assert sorted({r["phase"] for r in res.log}) == ["phase1-teacher", "phase2-codi-len2", "phase2-codi-len3"]
    assert res.meta["objective"]["name"] == "codi" and all("distill_steps" not in r for r in res.log)


def test_codi_resume_equals_an_uninterrupted_run(tmp_path):
    """Killed after stage 0 (stage 1's checkpoint missing): --resume reuses phase 1 and stage 0 and ends
    with the same weights as an uninterrupted run."""
    import shutil

    from interp.train.presets import train_preset

    full = train_preset("micro-codi-curriculum", tmp_path / "full", seed=4)
    train_preset("micro-codi-curriculum", tmp_path / "part", seed=4)
    shutil.rmtree(tmp_path / "part" / "phase2_stages" / "stage1")
    resumed = train_preset("micro-codi-curriculum", tmp_path / "part", seed=4, resume=True)
    a, b = full.llama.state_dict(), resumed.llama.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(full.prj.state_dict().values(), resumed.prj.state_dict().values(), strict=True))
    assert [r["phase"] for r in resumed.log] == [r["phase"] for r in full.log]
    with pytest.raises(ValueError, match="another config or seed"):
        train_preset("micro-codi-curriculum", tmp_path / "part", seed=4, resume=True, p2_lr=1e-4)


def test_codi_curriculum_must_end_at_the_task_length(tmp_path):
    from interp.train.presets import train_preset

    with pytest.raises(ValueError, match="ending at task_steps"):
        train_preset("micro-codi-curriculum", tmp_path / "out", p2_curriculum=(2,))
    assert not (tmp_path / "out").exists()  # refused before any work
