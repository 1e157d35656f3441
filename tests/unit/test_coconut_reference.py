"""The Coconut test reference itself, checked independently of `interp/`: the official multi-pass
KV-cache loop against a naive sequential loop, the checkpoint format, decoding, and the patching
strategies' fixed points."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.factories import make_reference_coconut
from tests.reference import COCONUT_MARKERS, ReferenceCoconut, coconut_answer, module_outputs, reference_coconut_patch

pytestmark = pytest.mark.usefixtures("one_thread")

CLEAN_Q = "Tom has 3 apples and buys 5 more."
CASES = ["tiny_gpt2_coconut", "tiny_llama_coconut"]
STRATEGIES = ["parallel", "iterative", "feedback"]


@pytest.fixture(params=CASES)
def case(request):
    return request.getfixturevalue(request.param)


def tail(tok) -> list[int]:
    return tok.encode("###", add_special_tokens=False)


def corrupt(ids: list[int], ref: ReferenceCoconut, tok) -> list[int]:
    """The same prompt with its first question token changed (same length, same latent positions)."""
    first = 1 if ids[0] == tok.bos_token_id else 0  # keep Llama's BOS
    out = list(ids)
    out[first] = (out[first] + 7) % ref.start_id
    return out


@torch.no_grad()
def naive_forward(ref: ReferenceCoconut, ids: list[int]):
    """For each latent position in order: the full prefix with no cache, hidden_states[-1] at the
    previous position written in. Returns (inputs_embeds [1, n, d], logits [1, n, V])."""
    base = ref.base_causallm
    embeds = base.get_input_embeddings()(torch.tensor([ids])).clone()
    for p in [i for i, t in enumerate(ids) if t == ref.latent_id]:
        out = base(inputs_embeds=embeds[:, :p], use_cache=False, output_hidden_states=True)
        embeds[0, p] = out.hidden_states[-1][0, p - 1]
    return embeds, base(inputs_embeds=embeds, use_cache=False).logits


def test_marker_ids_and_vocabulary(tiny_gpt2_coconut, tiny_llama_coconut):
    for case, first, eos in [(tiny_gpt2_coconut, 50257, 50256), (tiny_llama_coconut, 128256, 128009)]:
        ref, tok = case.ref, case.tokenizer
        assert (ref.start_id, ref.end_id, ref.latent_id) == (first, first + 1, first + 2)
        assert tok.convert_tokens_to_ids(list(COCONUT_MARKERS)) == [first, first + 1, first + 2]
        assert ref.eos_id == eos == tok.eos_token_id and tok.pad_token == tok.eos_token
        assert len(tok) == first + 3 == ref.embedding.weight.shape[0] == ref.base_causallm.get_output_embeddings().weight.shape[0]
        assert ref.embedding is ref.base_causallm.get_input_embeddings()  # one module, registered twice
        rows = ref.embedding.weight[first : first + 3]
        assert torch.cdist(rows, ref.embedding.weight[:first]).min() > 1e-2  # no marker row copies a base row
        assert torch.cdist(rows, rows).fill_diagonal_(1.0).min() > 1e-2


@pytest.mark.parametrize("k", [0, 1, 3])
def test_kv_cache_loop_equals_naive_loop(case, k):
    ref, tok = case.ref, case.tokenizer
    ids = ref.prompt_ids(tok, CLEAN_Q, k) + tail(tok)
    lengths = []
    handle = ref.base_causallm.base_model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        embeds, logits = ref.forward_ids(ids)
    finally:
        handle.remove()
    latent = ref.latent_positions(ids)
    assert len(latent) == k and (k == 0 or ids[latent[0] - 1] == ref.start_id)
    # k + 1 passes: [0, first latent), one position each, then the last latent to the end
    assert lengths == ([len(ids)] if k == 0 else [latent[0]] + [1] * (k - 1) + [len(ids) - latent[-1]])
    naive_embeds, naive_logits = naive_forward(ref, ids)
    assert logits.shape == (1, len(ids), len(tok)) and embeds.shape == (1, len(ids), ref.embedding.weight.shape[1])
    torch.testing.assert_close(embeds, naive_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, naive_logits, rtol=0, atol=1e-5)
    others = [i for i in range(len(ids)) if i not in latent]
    torch.testing.assert_close(embeds[0, others], ref.embed([ids[i] for i in others])[0], rtol=0, atol=0)
    if k:
        assert (embeds[0, latent] - ref.embed([ref.latent_id] * k)[0]).abs().max() > 1e-2  # the thoughts were written


def test_thought_is_final_normed_previous_state_after_start_marker(case):
    """hidden_states[-1] at p - 1 is the final norm of the last decoder layer's output (transformers 5
    still returns the normed state), computed here by hand with a hook."""
    ref, tok = case.ref, case.tokenizer
    ids = ref.prompt_ids(tok, CLEAN_Q, 3)
    embeds, _ = ref.forward_ids(ids)
    last = ref.layer_outputs(embeds)[-1]
    with torch.no_grad():
        by_hand = ref.final_norm(last)
    latent = ref.latent_positions(ids)
    torch.testing.assert_close(embeds[0, latent], by_hand[[p - 1 for p in latent]], rtol=0, atol=1e-5)
    assert ids[latent[0] - 1] == ref.start_id  # the first thought comes from <|start-latent|>


def test_gpt2_thought_excludes_wpe(tiny_gpt2_coconut):
    """The fed thought is ln_f(last block output at p - 1) with no position embedding in it; HF adds
    wpe[p] to it on the way in, as to any input embedding (hidden_states[0] = inputs_embeds + wpe)."""
    ref, tok = tiny_gpt2_coconut.ref, tiny_gpt2_coconut.tokenizer
    gpt2 = ref.base_causallm.transformer
    ids = ref.prompt_ids(tok, CLEAN_Q, 3) + tail(tok)
    embeds, _ = ref.forward_ids(ids)
    latent = ref.latent_positions(ids)
    got = []
    handle = gpt2.h[-1].register_forward_hook(lambda m, a, out: got.append((out[0] if isinstance(out, tuple) else out)[0].clone()))
    try:
        with torch.no_grad():
            hs = ref.base_causallm(inputs_embeds=embeds, position_ids=torch.arange(len(ids))[None], output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    with torch.no_grad():
        ln_f = torch.nn.functional.layer_norm(got[0], (got[0].shape[-1],), gpt2.ln_f.weight, gpt2.ln_f.bias, gpt2.ln_f.eps)
        wpe = gpt2.wpe.weight[latent]
    assert gpt2.ln_f.bias.abs().max() > 1e-3 and (gpt2.ln_f.weight - 1).abs().max() > 1e-3  # the fixture has non-trivial norms
    torch.testing.assert_close(embeds[0, latent], ln_f[[p - 1 for p in latent]], rtol=0, atol=1e-5)
    torch.testing.assert_close(hs[0][0, latent], embeds[0, latent] + wpe, rtol=0, atol=1e-6)  # wpe added once, by HF
    assert wpe.abs().max() > 1e-3
    assert (embeds[0, latent] - (ln_f[[p - 1 for p in latent]] + wpe)).abs().max() > 1e-3  # so "with wpe" would differ


def test_checkpoint_reloads_strict_from_the_base_directory(case):
    """Rebuild as run.py does from the base directory (original config and tokenizer, no markers):
    add the markers, resize, wrap, then load the saved checkpoint with strict=True."""
    ref, tok, base_dir, ckpt_dir = case
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint_3"] and case.checkpoint.is_file()
    state = torch.load(case.checkpoint, weights_only=True)
    assert all(k.startswith("base_causallm.") or k == "embedding.weight" for k in state)
    assert set(state) == set(ref.state_dict()) and "embedding.weight" in state
    assert not any(k.endswith((".attn.bias", ".attn.masked_bias")) for k in state)  # no causal-mask buffers in transformers 5
    config = AutoConfig.from_pretrained(base_dir)
    base_tok = AutoTokenizer.from_pretrained(base_dir)
    assert len(base_tok) == config.vocab_size == ref.start_id  # the base directory has no markers
    assert not set(COCONUT_MARKERS) & set(base_tok.get_vocab())
    torch.manual_seed(123)
    fresh_base = AutoModelForCausalLM.from_config(config).eval()
    fresh, fresh_tok = make_reference_coconut(fresh_base, base_tok, seed=99)
    assert (fresh.start_id, fresh.end_id, fresh.latent_id, fresh.eos_id) == (ref.start_id, ref.end_id, ref.latent_id, ref.eos_id)
    ids = ref.prompt_ids(tok, CLEAN_Q, 3) + tail(tok)
    assert fresh.prompt_ids(fresh_tok, CLEAN_Q, 3) + tail(fresh_tok) == ids
    assert (fresh.forward_ids(ids)[1] - ref.forward_ids(ids)[1]).abs().max() > 1e-3  # different weights before loading
    fresh.load_state_dict(state, strict=True)
    assert fresh.embedding.weight.data_ptr() == fresh.base_causallm.get_output_embeddings().weight.data_ptr()  # still tied
    torch.testing.assert_close(fresh.forward_ids(ids)[1], ref.forward_ids(ids)[1], rtol=0, atol=0)


@torch.no_grad()
def naive_generate(ref: ReferenceCoconut, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy decoding with full recompute (positions 0..n-1): the first token always kept, a later eos
    stops without being kept."""
    embeds, _ = naive_forward(ref, prompt)
    tokens: list[int] = []
    for step in range(max_new_tokens):
        token = int(ref.base_causallm(inputs_embeds=embeds, use_cache=False).logits[0, -1].argmax())
        if step > 0 and token == eos:
            break
        tokens.append(token)
        embeds = torch.cat([embeds, ref.base_causallm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    return tokens


def test_generate_follows_the_official_eos_rule(case, monkeypatch):
    ref, tok = case.ref, case.tokenizer
    prompt = ref.prompt_ids(tok, CLEAN_Q, 3)
    thoughts, generated = ref.generate_ids(prompt, 6)
    embeds, logits = ref.forward_ids(prompt)
    torch.testing.assert_close(thoughts, embeds[0, ref.latent_positions(prompt)], rtol=0, atol=0)
    assert generated[0] == int(logits[0, -1].argmax()) and 1 <= len(generated) <= 6
    assert generated == naive_generate(ref, prompt, 6, ref.eos_id)
    monkeypatch.setattr(ref, "eos_id", generated[0])  # the first token is kept even if it is eos ...
    first = ref.generate_ids(prompt, 6)[1]
    assert first[0] == generated[0] and generated[0] not in first[1:]  # ... a later eos stops decoding, not kept
    assert first == naive_generate(ref, prompt, 6, generated[0])
    monkeypatch.setattr(ref, "eos_id", -1)
    assert ref.generate_ids(prompt, 6)[1] == naive_generate(ref, prompt, 6, -1) and len(naive_generate(ref, prompt, 6, -1)) == 6
    assert coconut_answer(tok, prompt + generated) == tok.decode(prompt + generated, skip_special_tokens=True).split("#")[-1].replace(",", "").strip()


def test_answer_parsing():
    class Tok:
        def decode(self, tokens, skip_special_tokens):
            return "Q?\n<|start-latent|><|latent|><|end-latent|>### 1,234"

    assert coconut_answer(Tok(), []) == "1234"


def _clean(ref, tok, k=3):
    ids = ref.prompt_ids(tok, CLEAN_Q, k)
    thoughts, _ = ref.generate_ids(ids, 1)
    return ids, thoughts, ref.sequence_embeds(ids + tail(tok), thoughts)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_positions_is_the_unpatched_run(case, strategy):
    ref, tok = case.ref, case.tokenizer
    ids, thoughts, embeds = _clean(ref, tok)
    unpatched = ref.forward_ids(ids + tail(tok))[1][0, -1]
    outputs = module_outputs(ref, embeds, "layer", 1)
    logits, fed = reference_coconut_patch(ref, ids, thoughts, outputs, tail(tok), module="layer", layer=1, positions=[], strategy=strategy)
    torch.testing.assert_close(fed, thoughts, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, unpatched, rtol=0, atol=1e-5)
    logits, fed = reference_coconut_patch(ref, ids, thoughts, outputs, [], module="layer", layer=1, positions=[], strategy=strategy)
    assert int(logits.argmax()) == ref.generate_ids(ids, 1)[1][0]  # no tail: the first generated token


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("module,layer", [("layer", 0), ("layer", 2), ("attn", 1), ("mlp", 0)])
def test_clean_into_clean_is_the_clean_run(case, strategy, module, layer):
    ref, tok = case.ref, case.tokenizer
    ids, thoughts, embeds = _clean(ref, tok)
    clean_logits = ref.forward_ids(ids + tail(tok))[1][0, -1]
    outputs = module_outputs(ref, embeds, module, layer)
    latent = ref.latent_positions(ids)
    positions = [latent[0] - 1, *latent, len(ids) - 1, len(ids)]  # start marker, latents, end marker, the first tail token
    logits, fed = reference_coconut_patch(ref, ids, thoughts, outputs, tail(tok), module=module, layer=layer, positions=positions, strategy=strategy)
    torch.testing.assert_close(fed, thoughts, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, clean_logits, rtol=0, atol=1e-5)


def test_layer_outputs_and_module_outputs_agree(case):
    ref, tok = case.ref, case.tokenizer
    _, _, embeds = _clean(ref, tok)
    layers = ref.layer_outputs(embeds)
    assert len(layers) == len(ref.blocks)
    for i, out in enumerate(layers):
        torch.testing.assert_close(module_outputs(ref, embeds, "layer", i), out, rtol=0, atol=0)
    with torch.no_grad():
        hs = ref.full(embeds).hidden_states
    for i in range(len(layers) - 1):
        torch.testing.assert_close(hs[i + 1][0], layers[i], rtol=0, atol=0)


@pytest.fixture(params=CASES)
def pair(request):
    """(ref, tok, clean ids, clean thoughts, clean embeds, corrupted ids, corrupted thoughts)."""
    case = request.getfixturevalue(request.param)
    ref, tok = case.ref, case.tokenizer
    ids, thoughts, embeds = _clean(ref, tok)
    bad = corrupt(ids, ref, tok)
    bad_thoughts, _ = ref.generate_ids(bad, 1)
    assert (bad_thoughts - thoughts).abs().max() > 1e-3
    return ref, tok, ids, thoughts, embeds, bad, bad_thoughts


def test_patch_semantics(pair):
    """What each strategy must do, on a real corrupted/clean pair."""
    ref, tok, ids, thoughts, embeds, bad, bad_thoughts = pair
    latent = ref.latent_positions(ids)
    last_layer = len(ref.blocks) - 1
    run = lambda module, layer, positions, strategy: reference_coconut_patch(
        ref, bad, bad_thoughts, module_outputs(ref, embeds, module, layer), tail(tok), module=module, layer=layer, positions=positions, strategy=strategy
    )
    unpatched = ref.forward_ids(bad + tail(tok))[1][0, -1]
    # feedback at the last latent feeds no thought and leaves the final pass alone: the corrupted run
    logits, fed = run("layer", 1, [latent[-1]], "feedback")
    torch.testing.assert_close(fed, bad_thoughts, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, unpatched, rtol=0, atol=1e-5)
    # at the last latent, iterative and parallel agree (no later thought reads it)
    par, it = run("layer", 1, [latent[-1]], "parallel"), run("layer", 1, [latent[-1]], "iterative")
    torch.testing.assert_close(it[1], bad_thoughts, rtol=0, atol=1e-5)
    torch.testing.assert_close(it[0], par[0], rtol=0, atol=1e-5)
    assert (par[0] - unpatched).abs().max() > 1e-4
    # parallel holds the corrupted thoughts whatever it patches; iterative regenerates those after the patch
    par, it = run("layer", 1, [latent[0]], "parallel"), run("layer", 1, [latent[0]], "iterative")
    torch.testing.assert_close(par[1], bad_thoughts, rtol=0, atol=0)
    torch.testing.assert_close(it[1][0], bad_thoughts[0], rtol=0, atol=1e-5)
    assert (it[1][1:] - bad_thoughts[1:]).abs().max() > 1e-3
    # feedback with the last layer's output at latent t: thought t + 1 becomes the clean one exactly
    logits, fed = run("layer", last_layer, [latent[0]], "feedback")
    torch.testing.assert_close(fed[:1], bad_thoughts[:1], rtol=0, atol=1e-5)
    torch.testing.assert_close(fed[1], thoughts[1], rtol=0, atol=1e-5)
    # ... and at the start marker, thought 0 does
    logits, fed = run("layer", last_layer, [latent[0] - 1], "feedback")
    torch.testing.assert_close(fed[0], thoughts[0], rtol=0, atol=1e-5)
    # the final pass of feedback is unpatched: patching the end marker (never a pass's last in the loop) is a no-op
    logits, fed = run("layer", 0, [len(ids) - 1], "feedback")
    torch.testing.assert_close(logits, unpatched, rtol=0, atol=1e-5)
    assert (run("layer", 0, [len(ids) - 1], "parallel")[0] - unpatched).abs().max() > 1e-4
