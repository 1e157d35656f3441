"""load_codi + generate against the independent plain-HF/peft reference on a tiny Llama-3.2-shaped model."""

from __future__ import annotations

import pytest
import torch

from interp import CheckpointError, load_codi

QUESTIONS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "A train travels 60 miles in 1.5 hours. What is its speed?",
    "2 + 2",
]
MAX_NEW = 6


def assert_matches_reference(model, ref, tokenizer, questions):
    for q in questions:
        gen = model.generate(q, max_new_tokens=MAX_NEW)
        ids = tokenizer(q)["input_ids"]
        latents, answer = ref.generate(ids, bot=model.bot_id, eot=model.eot_id, eos=model.eos_id, num_latents=model.num_latents, max_new_tokens=MAX_NEW)
        assert gen.question_ids.tolist() == ids
        assert gen.answer_ids.tolist() == answer
        assert gen.latents.shape == (6, model.cfg.d_model)
        rel = (gen.latents - latents).norm(dim=-1) / latents.norm(dim=-1)
        assert rel.max() < 1e-4, rel


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_generate_matches_reference(tiny_codi, fmt):
    ref, base, tok, paths = tiny_codi
    model = load_codi(paths[fmt], (base, tok), device="cpu")
    assert (model.pad_id, model.bot_id, model.eot_id) == (128256, 128257, 128258)
    assert model.cfg.d_vocab == 128259 and model.cfg.d_head == 32 and model.cfg.n_key_value_heads == 2
    assert model.cfg.use_NTK_by_parts_rope and model.cfg.NTK_original_ctx_len == 8
    assert model.lora == {"rank": 8, "targets": sorted(["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"])}
    assert_matches_reference(model, ref, tok, QUESTIONS)


@pytest.fixture(scope="module")
def tiny_model(tiny_codi):
    ref, base, tok, paths = tiny_codi
    return load_codi(paths["bin"], (base, tok), device="cpu")


def test_resid_post_matches_decoder_layer_outputs(tiny_codi, tiny_model):
    ref, _, tok, _ = tiny_codi
    q = QUESTIONS[0]
    trace = tiny_model.trace(q, answer=8)
    ids = tok(q)["input_ids"]
    tail = tiny_model.prefix_ids().tolist() + trace.answer_ids.tolist()
    embeds = ref.sequence_embeds(ids, trace.latents, tail, bot=tiny_model.bot_id, eot=tiny_model.eot_id)
    assert embeds.shape[1] == trace.seq_len > 8  # positions run past the original rope context (8)
    outputs = ref.layer_outputs(embeds)
    assert len(outputs) == tiny_model.cfg.n_layers
    for layer, expected in enumerate(outputs):
        got = trace.cache[f"blocks.{layer}.hook_resid_post"][0]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_trace_positions_and_answer_logits(tiny_codi, tiny_model):
    ref, _, tok, _ = tiny_codi
    q = QUESTIONS[1]
    trace = tiny_model.trace(q, answer=40)
    n_q = len(tok(q)["input_ids"])
    assert trace.latent_positions == list(range(n_q + 1, n_q + 7))
    assert trace.position("bot") == n_q and trace.position("eot") == n_q + 7
    prefix = tok("The answer is:", add_special_tokens=False)["input_ids"]
    assert trace.answer_position == n_q + 7 + len(prefix)
    # Llama-3 writes " 40" as " " + "40": the answer's first token is the space.
    assert [tok.decode([i]) for i in trace.answer_ids] == [" ", "40"]
    embeds = ref.sequence_embeds(tok(q)["input_ids"], trace.latents, prefix, bot=tiny_model.bot_id, eot=tiny_model.eot_id)
    expected = ref.codi(inputs_embeds=embeds).logits[0, -1]
    torch.testing.assert_close(trace.answer_logits, expected.detach(), rtol=1e-4, atol=1e-4)


def test_batched_generation_equals_one_by_one(tiny_model):
    batch = tiny_model.generate_batch(QUESTIONS, max_new_tokens=MAX_NEW)
    for q, got in zip(QUESTIONS, batch):
        alone = tiny_model.generate(q, max_new_tokens=MAX_NEW)
        assert got.answer_ids.tolist() == alone.answer_ids.tolist()
        torch.testing.assert_close(got.latents, alone.latents, rtol=1e-4, atol=1e-5)


def test_user_hooks_are_active_in_every_pass(tiny_model):
    calls = []

    def count(act, hook):
        calls.append(act.shape[1])

    gen = tiny_model.generate(QUESTIONS[2], max_new_tokens=3, fwd_hooks=[("blocks.0.hook_resid_pre", count)])
    n_q = len(gen.question_ids)
    # prefill (question + bot), six latent steps, eot, then one pass per further token
    assert calls[:8] == [n_q + 1] + [1] * 6 + [1]
    assert len(calls) == 1 + 6 + len(gen.answer_ids)


def test_decode_latents_reads_the_unembedding(tiny_model):
    gen = tiny_model.generate(QUESTIONS[0], max_new_tokens=2)
    rows = tiny_model.decode_latents(gen, k=3)
    assert len(rows) == 6
    # latent t's fed embedding through W_U, computed by hand
    logits = (gen.latents[2] @ tiny_model.model.W_U)[: tiny_model.eot_id]
    top = logits.topk(3).indices.tolist()
    assert [tok for tok, _ in rows[2]["embedding"]] == [tiny_model.tokenizer.decode([i]) for i in top]
    probs = [p for _, p in rows[2]["state"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1


# --------------------------------------------------------------------------- malformed checkpoints

PEFT = "codi.base_model.model."
L0 = PEFT + "model.layers.0."


def _drop(*keys):
    return lambda s: {k: v for k, v in s.items() if k not in keys}


def _add(key, value):
    return lambda s: {**s, key: value}


def _replace(key, fn):
    return lambda s: {**s, key: fn(s[key])}


def _rank4(s):
    s = dict(s)
    s[L0 + "self_attn.q_proj.lora_A.default.weight"] = torch.randn(4, 64)
    s[L0 + "self_attn.q_proj.lora_B.default.weight"] = torch.randn(128, 4)
    return s


def _plain_key_mix(s):
    return {**s, "codi.model.norm.weight": s[PEFT + "model.norm.weight"]}


MALFORMED = {
    "missing layer norm": (_drop(L0 + "input_layernorm.weight"), "missing keys: model.layers.0.input_layernorm.weight"),
    "unused key": (_add(L0 + "extra.weight", torch.zeros(3)), "unused keys: model.layers.0.extra.weight"),
    "stray top-level key": (_add("optimizer.step", torch.zeros(1)), "unused keys outside codi.* and prj.*: optimizer.step"),
    "mis-shaped norm": (
        _replace(L0 + "post_attention_layernorm.weight", lambda v: torch.ones(65)),
        "mis-shaped keys: model.layers.0.post_attention_layernorm.weight (65,) (expected (64,))",
    ),
    "duplicated base weight": (
        lambda s: {**s, L0 + "self_attn.q_proj.weight": s[L0 + "self_attn.q_proj.base_layer.weight"]},
        "duplicated keys: both a base_layer and a plain weight for model.layers.0.self_attn.q_proj.weight",
    ),
    "rank differs": (_rank4, "LoRA rank differs between modules (r=4: model.layers.0.self_attn.q_proj; r=8:"),
    "lora_B missing": (
        _drop(L0 + "mlp.up_proj.lora_B.default.weight"),
        "missing LoRA keys: model.layers.0.mlp.up_proj.lora_B.default.weight",
    ),
    "mis-shaped lora_A": (
        _replace(L0 + "mlp.down_proj.lora_A.default.weight", lambda v: torch.zeros(8, 95)),
        "mis-shaped LoRA for model.layers.0.mlp.down_proj: lora_A (8, 95), lora_B (64, 8), base weight (64, 96)",
    ),
    "vocabulary not grown": (
        lambda s: {**s, **{k: s[k][:-3] for k in (PEFT + "model.embed_tokens.weight", PEFT + "lm_head.weight")}},
        "The embedding has 128256 rows; a CODI checkpoint has the base vocabulary (128256) + 3 (pad, bot, eot)",
    ),
    "prj bias missing": (_drop("prj.3.bias"), "missing keys: prj.3.bias (the projection MLP)"),
    "prj mis-shaped": (
        _replace("prj.3.weight", lambda v: torch.zeros(64, 40)),
        "mis-shaped keys: prj.3.weight (64, 40) (expected (64, 48))",
    ),
    "untied lm_head": (
        _replace(PEFT + "lm_head.weight", lambda v: v + 1),
        "checkpoint's lm_head.weight (128259, 64) differs from model.embed_tokens.weight (128259, 64)",
    ),
    "mixed prefixes": (_plain_key_mix, "checkpoint mixes peft-wrapped keys"),
    "no codi keys": (lambda s: {k: v for k, v in s.items() if k.startswith("prj.")}, "checkpoint holds no codi.* keys"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_errors(tiny_codi, case):
    ref, base, tok, _ = tiny_codi
    mutate, message = MALFORMED[case]
    state = mutate({k: v.clone() for k, v in ref.state_dict().items()})
    with pytest.raises(CheckpointError) as info:
        load_codi(state, (base, tok), device="cpu")
    assert message in str(info.value)


def test_base_with_other_architecture(tiny_codi):
    from transformers import LlamaForCausalLM

    ref, base, tok, paths = tiny_codi
    deeper = LlamaForCausalLM(base.config.__class__.from_dict({**base.config.to_dict(), "num_hidden_layers": 4}))
    with pytest.raises(CheckpointError, match=r"does not match the base model's architecture \(llama, 4 layers, d_model 64\): missing keys: model.layers.3"):
        load_codi(paths["bin"], (deeper, tok), device="cpu")


def test_unreadable_and_unsafe_files(tiny_codi, tmp_path):
    _, base, tok, _ = tiny_codi
    garbage = tmp_path / "garbage" / "pytorch_model.bin"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*garbage/pytorch_model.bin"):
        load_codi(garbage.parent, (base, tok), device="cpu")
    pickled = tmp_path / "pickle.bin"
    torch.save({"prj.1.weight": torch.zeros(1), "hook": print}, pickled)  # needs code to unpickle
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_codi(pickled, (base, tok), device="cpu")
    with pytest.raises(CheckpointError, match="no checkpoint in .*expected one of model.safetensors, pytorch_model.bin"):
        load_codi(tmp_path, (base, tok), device="cpu")


def test_unsupported_base_type_is_refused(tiny_codi, tmp_path):
    from transformers import BertConfig

    _, _, tok, paths = tiny_codi
    BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="base model type is 'bert'; CODI bases of type 'llama', 'gpt2' load"):
        load_codi(paths["bin"], tmp_path, device="cpu")
