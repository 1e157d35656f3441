"""CODI-GPT-2: a tiny random GPT-2 CODI in the official layout against the plain HF + peft reference.

GPT-2 differs from LLaMA where a loader can go wrong silently: Conv1D LoRA (fan_in_fan_out, delta
transposed, merged before c_attn is split into Q/K/V), learned positions that TransformerLens skips
for fed embeddings, a final LayerNorm with a bias that the latents include, no BOS, and a tokenizer
that gets `[PAD]`. The tokenizer is the real GPT-2 one.
"""

from __future__ import annotations

import pytest
import torch

from interp import CheckpointError, load_codi
from interp.engine import BatchPatcher, Job
from interp.patching import latent_sites, patch, patch_sites
from tests.reference import reference_patch_pair

QUESTIONS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "A train travels 60 miles in 2 hours. What is its speed?",
    "2 + 2",
]
MAX_NEW = 6
TOL = 1e-4


@pytest.fixture(scope="module")
def model(tiny_gpt2_codi):
    _, base, tok, paths = tiny_gpt2_codi
    return load_codi(paths["safetensors"], (base, tok), device="cpu")


@pytest.fixture(scope="module")
def reference_runs(tiny_gpt2_codi, model):
    """question -> (question ids, reference latents [6, d], reference answer ids), computed once."""
    ref, _, tok, _ = tiny_gpt2_codi
    runs = {}
    for q in QUESTIONS:
        ids = tok(q)["input_ids"]
        runs[q] = (ids, *ref.generate(ids, bot=model.bot_id, eot=model.eot_id, eos=model.eos_id, num_latents=6, max_new_tokens=MAX_NEW))
    return runs


def max_latent_diff(gen, run):
    """Same tokens as the reference run required; returns the latents' max abs diff."""
    ids, latents, answer = run
    assert gen.question_ids.tolist() == ids  # no BOS: GPT-2's tokenizer adds none
    assert gen.answer_ids.tolist() == answer
    return float((gen.latents - latents).abs().max())


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_official_layout_loads_and_matches_reference(tiny_gpt2_codi, reference_runs, fmt):
    _, base, tok, paths = tiny_gpt2_codi
    model = load_codi(paths[fmt], (base, tok), device="cpu")
    assert (model.pad_id, model.bot_id, model.eot_id, model.eos_id) == (50257, 50258, 50259, 50256)
    cfg = model.cfg
    assert (cfg.d_vocab, cfg.positional_embedding_type, cfg.normalization_type, cfg.n_ctx) == (50260, "standard", "LN", 128)
    assert model.lora == {"rank": 8, "targets": ["c_attn", "c_fc", "c_proj"]}
    assert model.tokenizer.pad_token == "[PAD]" and model.tokenizer.pad_token_id == 50257
    assert tok.pad_token_id is None  # the caller's tokenizer is left as it was
    assert model.load_options["model_type"] == "gpt2" and model.load_options["remove_eos"] is True
    diffs = [max_latent_diff(model.generate(q, max_new_tokens=MAX_NEW), reference_runs[q]) for q in QUESTIONS]
    assert max(diffs) < TOL, diffs


def test_answer_logits_and_every_layer_match_reference(tiny_gpt2_codi, model):
    ref, _, tok, _ = tiny_gpt2_codi
    q = QUESTIONS[1]
    trace = model.trace(q, answer=30)
    ids = tok(q)["input_ids"]
    assert [tok.decode([i]) for i in trace.answer_ids] == [" 30"]
    tail = model.prefix_ids().tolist() + trace.answer_ids.tolist()
    embeds = ref.sequence_embeds(ids, trace.latents, tail, bot=model.bot_id, eot=model.eot_id)
    assert embeds.shape[1] == trace.seq_len
    expected = ref.codi(inputs_embeds=embeds).logits[0].detach()
    torch.testing.assert_close(trace.answer_logits, expected[trace.answer_position], rtol=TOL, atol=TOL)
    for layer, out in enumerate(ref.layer_outputs(embeds)):
        torch.testing.assert_close(trace.cache[f"blocks.{layer}.hook_resid_post"][0], out, rtol=TOL, atol=TOL)


def test_learned_positions_fire_hook_pos_embed_at_absolute_positions(model):
    """Prompt of L tokens (question + bot): latent i at L + i, eot at L + 6, as HF GPT-2 at batch 1."""
    seen = []
    gen = model.generate(QUESTIONS[2], max_new_tokens=2, fwd_hooks=[("hook_pos_embed", lambda act, hook: seen.append(act[0].clone()))])
    n = len(gen.question_ids) + 1
    w_pos = model.model.W_pos
    torch.testing.assert_close(seen[0], w_pos[:n], rtol=0, atol=0)
    for i in range(6):
        torch.testing.assert_close(seen[1 + i], w_pos[n + i : n + i + 1], rtol=0, atol=0)
    torch.testing.assert_close(seen[7], w_pos[n + 6 : n + 7], rtol=0, atol=0)
    trace = model.trace(QUESTIONS[2])
    torch.testing.assert_close(trace.cache["hook_pos_embed"][0], w_pos[: trace.seq_len], rtol=0, atol=0)


def test_left_padded_batch_matches_reference_row_by_row(model, reference_runs):
    batch = model.generate_batch(QUESTIONS, max_new_tokens=MAX_NEW)
    assert len({len(g.question_ids) for g in batch}) == 3  # three different paddings
    diffs = [max_latent_diff(got, reference_runs[q]) for q, got in zip(QUESTIONS, batch)]
    assert max(diffs) < TOL, diffs


# ----------------------------------------------------------------------------- patching

CLEAN_Q, CORRUPTED_Q = "Tom has 3 apples and buys 5 more.", "Tom has 4 apples and buys 5 more."
HOOKS = {"layer": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}


@pytest.fixture(scope="module")
def traces(model):
    return model.trace(CLEAN_Q), model.trace(CORRUPTED_Q)


@pytest.mark.parametrize("strategy", ["parallel", "iterative"])
@pytest.mark.parametrize("module,layer,latents", [("layer", 2, [1, 3]), ("attn", 1, [2]), ("mlp", 0, [1])])
def test_patch_matches_reference_hook_patching(tiny_gpt2_codi, model, traces, strategy, module, layer, latents):
    ref = tiny_gpt2_codi[0]
    clean, corrupted = traces
    result = patch(model, corrupted, clean, f"blocks.{layer}.{HOOKS[module]}", latents, strategy, with_cache=False)
    logits, fed = reference_patch_pair(ref, model, CLEAN_Q, CORRUPTED_Q, clean, corrupted, module=module, layer=layer, latents=latents, strategy=strategy)
    torch.testing.assert_close(result.answer_logits, logits, rtol=TOL, atol=TOL)
    torch.testing.assert_close(result.latents, fed, rtol=TOL, atol=TOL)


def test_batched_engine_with_left_padding_equals_one_at_a_time(model, traces):
    """Two pairs whose prompts differ in length share each forward pass (left padding + learned positions)."""
    short = traces[1], traces[0]
    long = model.trace("A train travels 80 miles in 2 hours. What is its speed?"), model.trace(QUESTIONS[1])
    assert long[0].seq_len != short[0].seq_len
    pairs = [short, long]
    jobs = [
        Job((latent_sites(pairs[p][0], hook, lat),), strategy, pair=p)
        for p in (0, 1)
        for strategy in ("parallel", "iterative")
        for hook, lat in (("blocks.1.hook_resid_post", (0,)), ("blocks.0.hook_resid_pre", (2, 3)), ("blocks.2.hook_mlp_out", (5,)))
    ]
    batched = BatchPatcher(model, pairs, batch_size=len(jobs), max_new_tokens=MAX_NEW).run(jobs)
    for job, got in zip(jobs, batched):
        corrupted, clean = pairs[job.pair]
        alone = patch_sites(model, corrupted, clean, job.sites, job.strategy, with_cache=False, max_new_tokens=MAX_NEW)
        assert (got.answer_logits - alone.answer_logits).abs().max() < 1e-5
        assert (got.latents - alone.latents).abs().max() < 1e-5
        assert got.generation.answer_ids.tolist() == alone.generation.answer_ids.tolist()


# ----------------------------------------------------------------------------- malformed checkpoints

PEFT = "codi.base_model.model."
H0 = PEFT + "transformer.h.0."


def _replace(key, fn):
    return lambda s: {**s, key: fn(s[key])}


def _nan(s):
    w = s[H0 + "mlp.c_fc.base_layer.weight"].clone()
    w[3, 5] = float("nan")
    return {**s, H0 + "mlp.c_fc.base_layer.weight": w}


def _off_target(s):
    s = dict(s)
    for kind in ("base_layer.weight", "base_layer.bias", "lora_A.default.weight", "lora_B.default.weight"):
        s[H0 + f"mlp.c_xx.{kind}"] = s.pop(H0 + f"mlp.c_fc.{kind}")
    return s


MALFORMED = {
    "vocabulary not grown": (
        lambda s: {**s, **{k: s[k][:-3] for k in (PEFT + "transformer.wte.weight", PEFT + "lm_head.weight")}},
        "The embedding has 50257 rows; a CODI checkpoint has the base vocabulary (50257) + 3 (pad, bot, eot)",
    ),
    "Linear-shaped LoRA on a Conv1D": (
        _replace(H0 + "mlp.c_fc.lora_B.default.weight", lambda v: torch.zeros(64, 8)),
        ("mis-shaped LoRA for transformer.h.0.mlp.c_fc: lora_A (8, 64), lora_B (64, 8), base weight (64, 256) (Conv1D [in, out]); expected lora_A (r, 64) and lora_B (256, r)"),
    ),
    "position embeddings missing": (
        lambda s: {k: v for k, v in s.items() if not k.endswith("wpe.weight")},
        "missing keys: transformer.wpe.weight",
    ),
    "LoRA off the CODI targets": (_off_target, "LoRA on modules that CODI does not wrap in a gpt2 model: transformer.h.0.mlp.c_xx"),
    "NaN weight": (_nan, "non-finite values (NaN or Inf) in codi.base_model.model.transformer.h.0.mlp.c_fc.base_layer.weight"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_gpt2_checkpoint_errors(tiny_gpt2_codi, case):
    ref, base, tok, _ = tiny_gpt2_codi
    mutate, message = MALFORMED[case]
    with pytest.raises(CheckpointError) as info:
        load_codi(mutate({k: v.clone() for k, v in ref.state_dict().items()}), (base, tok), device="cpu")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_llama_checkpoint_on_gpt2_base_and_back(tiny_gpt2_codi, tiny_codi):
    gpt2_ref, gpt2_base, gpt2_tok, _ = tiny_gpt2_codi
    llama_ref, llama_base, llama_tok, _ = tiny_codi
    with pytest.raises(CheckpointError, match=r"^the checkpoint holds a llama model \(model.embed_tokens.weight\) but the base is gpt2"):
        load_codi(llama_ref.state_dict(), (gpt2_base, gpt2_tok), device="cpu")
    with pytest.raises(CheckpointError, match=r"^the checkpoint holds a gpt2 model \(transformer.wte.weight\) but the base is llama"):
        load_codi(gpt2_ref.state_dict(), (llama_base, llama_tok), device="cpu")


def test_old_saves_with_attention_mask_buffers_load(tiny_gpt2_codi, model):
    """transformers < 4.3x saved GPT-2's causal-mask buffers (attn.bias, attn.masked_bias): constants, not weights."""
    ref, base, tok, _ = tiny_gpt2_codi
    state = dict(ref.state_dict())
    for layer in range(3):
        state[PEFT + f"transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(128, 128, dtype=torch.bool))[None, None]
        state[PEFT + f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    old = load_codi(state, (base, tok), device="cpu")
    for name, p in model.model.named_parameters():
        assert torch.equal(p, old.model.get_parameter(name)), name
