"""The word-level tokenizer of the embedded model, and its HF base directory.

Twenty base tokens (ids in this order): `<s> </s> <unk> 0..9 + - * : The answer is`.
The pre-tokenizer splits on whitespace and isolates every digit and punctuation character
(`"7 +5 *3"` -> `7 + 5 * 3`, `"The answer is: 4"` -> `The answer is : 4`); a template
post-processor prepends `<s>` like Llama's tokenizer; the decoder joins tokens with spaces.
CODI's three extra rows (pad = V, bot = V+1, eot = V+2) live in the model, not in the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
VOCAB: tuple[str, ...] = (BOS, EOS, UNK, *[str(i) for i in range(10)], "+", "-", "*", ":", "The", "answer", "is")
V = len(VOCAB)  # 20 base tokens
BOS_ID, EOS_ID, UNK_ID = 0, 1, 2
PAD_ID, BOT_ID, EOT_ID = V, V + 1, V + 2  # CODI's extra embedding rows
DIGIT_IDS: tuple[int, ...] = tuple(VOCAB.index(str(i)) for i in range(10))
ANSWER_PREFIX = "The answer is:"


def build_tokenizer() -> Tokenizer:
    """The raw `tokenizers.Tokenizer` (see the module docstring)."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=UNK))
    tok.add_special_tokens([BOS, EOS, UNK])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation("isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    return tok


def hf_tokenizer():
    """A `transformers.PreTrainedTokenizerFast` wrapping `build_tokenizer()`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), bos_token=BOS, eos_token=EOS, unk_token=UNK)


def llama_config(
    *,
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 336,
    max_position_embeddings: int = 64,
    vocab_size: int = V,
):
    """The `LlamaConfig` of the BASE model (vocab_size = V by default, without the 3 rows a CODI or Coconut
    model adds; <s> = 0, </s> = 1 in both task vocabularies)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        attention_bias=False,
        mlp_bias=False,
    )


def save_base_dir(out_dir: str | Path, config=None) -> Path:
    """Write `config.json`, `tokenizer.json`, `tokenizer_config.json` (no weights) to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config if config is not None else llama_config()
    if config.vocab_size != V:
        raise ValueError(f"the base config must have vocab_size={V} (the base vocab), got {config.vocab_size}")
    config.save_pretrained(out)
    hf_tokenizer().save_pretrained(out)
    # keep the directory minimal: config + tokenizer files only (older transformers also write these)
    for extra in ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "generation_config.json"):
        if (out / extra).exists():
            (out / extra).unlink()
    _check_round_trip(out)
    return out


def _check_round_trip(base_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    ref = hf_tokenizer()
    for s in ("7 +5 *3 -2 *7 +4 -1", "The answer is: 4"):
        if tok(s)["input_ids"] != ref(s)["input_ids"]:
            raise RuntimeError(f"tokenizer in {base_dir} does not round-trip on {s!r}")
    if (tok.bos_token, tok.eos_token, tok.unk_token) != (BOS, EOS, UNK):
        raise RuntimeError(f"special tokens did not round-trip in {base_dir}")
    cfg = AutoConfig.from_pretrained(base_dir)
    if cfg.vocab_size != V or not cfg.tie_word_embeddings:
        raise RuntimeError(f"config in {base_dir} did not round-trip")
    json.loads((base_dir / "tokenizer_config.json").read_text())
