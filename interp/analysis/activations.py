"""Problems with known intermediate values, and the activations every analysis reads.

`collect(model, problems)` runs the real latent loop on every question (`generate_batch`), then
one teacher-forced pass per batch over [question, bot, latents, eot, answer prefix] (left-padded),
and keeps only what the analyses read:

- the residual stream at the named positions `bot`, `latent[t]`, `eot` and `answer` (the last
  prefix token, whose next token is the answer's first) for every layer: layer -1 is the input
  embedding (`blocks.0.hook_resid_pre`; at a latent position the fed latent itself) and layer L
  is `blocks.L.hook_resid_post`;
- the attention weights from the query positions `latent[t]`, `eot` and `answer` to the key
  groups `question` (every position before bot, summed), `bot`, `latent[j]`, `eot` and `prefix`
  (the positions after eot up to the answer position, summed), per layer and head.

Everything after bot has the same length in every row, so with left padding bot, the latents,
eot and the answer position sit in the same columns of every row of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from interp.data.align import answer_text
from interp.data.pairs import Pair
from interp.layout import SequenceLayout
from interp.model import Generation, LatentModel

EMBED_LAYER = -1  # the input embedding, blocks.0.hook_resid_pre


@dataclass(frozen=True)
class Problem:
    """A question, its answer and the value after each step of its solution (the last is the answer)."""

    question: str
    answer: float
    intermediates: tuple[float, ...]

    @property
    def targets(self) -> dict[str, float]:
        """`step[k]` (k from 1) for each intermediate value, and `answer`."""
        return {**{f"step[{k + 1}]": v for k, v in enumerate(self.intermediates)}, "answer": self.answer}


def problems_from_pairs(pairs: Sequence[Pair], sides: Sequence[str] = ("clean",)) -> list[Problem]:
    """The problems of the chosen sides (`clean`, `corrupted`) of each pair, in pair order."""
    out = []
    for pair in pairs:
        for side in sides:
            if side not in ("clean", "corrupted"):
                raise ValueError(f"unknown side {side!r}; use 'clean' or 'corrupted'")
            out.append(Problem(getattr(pair, f"{side}_question"), getattr(pair, f"{side}_answer"), getattr(pair, f"{side}_intermediates")))
    return out


def value_token(tokenizer, value: float) -> int:
    """The first token id of a value as written ("18", "-3", "2.5": no leading space)."""
    ids = tokenizer(answer_text(value), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the tokenizer gives no tokens for {answer_text(value)!r}")
    return int(ids[0])


def layer_hook(layer: int) -> str:
    """The residual hook a layer index reads: -1 = `blocks.0.hook_resid_pre`, L = `blocks.L.hook_resid_post`."""
    return "blocks.0.hook_resid_pre" if layer == EMBED_LAYER else f"blocks.{layer}.hook_resid_post"


@dataclass
class Activations:
    """What `collect` kept, for n problems.

    resid [n, n_layers + 1, len(positions), d_model] (float32, CPU; layer index i is model layer
    `layers[i]`); attention [n, n_layers, n_heads, len(queries), len(keys)] (float32; a query's
    weights over the key groups sum to 1, keys after the query get 0). `correct[i]`: the model's
    free answer equals problem i's answer.
    """

    problems: list[Problem]
    generations: list[Generation]
    layers: list[int]
    positions: list[str]
    resid: Tensor
    queries: list[str]
    keys: list[str]
    attention: Tensor

    @property
    def correct(self) -> list[bool]:
        return [g.answer == p.answer for g, p in zip(self.generations, self.problems)]


def position_names(num_latents: int) -> list[str]:
    return ["bot"] + [f"latent[{t}]" for t in range(num_latents)] + ["eot", "answer"]


def key_names(num_latents: int) -> list[str]:
    return ["question", "bot"] + [f"latent[{t}]" for t in range(num_latents)] + ["eot", "prefix"]


def _named_columns(layout: SequenceLayout, offset: int) -> tuple[dict[str, int], Tensor]:
    """Columns of the named positions of one row left-padded by `offset`, and the key group of every
    column ([offset + seq] long, -1 for padding): `question` (the question and its suffix), `bot`,
    `latent[t]`, `eot`, `prefix` (everything after eot: its suffix and the answer prefix)."""
    k = layout.num_latents
    columns = {name: layout.position(name) + offset for name in position_names(k)}
    group = torch.full((offset + layout.seq_len,), -1, dtype=torch.long)
    group[offset : offset + layout.bot] = 0
    group[offset + layout.bot : offset + layout.eot + 1] = torch.arange(1, k + 3)
    group[offset + layout.eot + 1 :] = k + 3
    return columns, group


@torch.no_grad()
def collect(model: LatentModel, problems: Sequence[Problem], batch_size: int = 64) -> Activations:
    """Run every problem (real latent loop, then one teacher-forced pass) and keep the residuals and
    grouped attention the analyses read (see the module docstring)."""
    if not problems:
        raise ValueError("no problems to analyse")
    k = model.num_latents
    positions, keys = position_names(k), key_names(k)
    queries = positions[1 : 1 + k] + ["eot", "answer"]
    layers = [EMBED_LAYER, *range(model.cfg.n_layers)]
    generations, resid, attention = [], [], []
    for i in range(0, len(problems), batch_size):
        gens, res, att = _collect_batch(model, problems[i : i + batch_size], layers, positions, queries, keys)
        generations += gens
        resid.append(res)
        attention.append(att)
    return Activations(list(problems), generations, layers, positions, torch.cat(resid), queries, keys, torch.cat(attention))


def _collect_batch(model: LatentModel, batch: Sequence[Problem], layers: list[int], positions: list[str], queries: list[str], keys: list[str]) -> tuple[list[Generation], Tensor, Tensor]:
    """One batch: (generations, resid [b, layers, positions, d_model], attention [b, n_layers, heads, queries, keys])."""
    gens = model.generate_batch([p.question for p in batch])
    seqs = [model.sequence(g.question_ids, g.latents) for g in gens]
    width = max(len(t) for t, _ in seqs)
    embeds = torch.zeros(len(seqs), width, model.cfg.d_model, dtype=seqs[0][1].dtype, device=model.device)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    groups = torch.full((len(seqs), width), -1, dtype=torch.long)
    for r, ((tokens, emb), gen) in enumerate(zip(seqs, gens)):
        offset = width - len(tokens)
        embeds[r, offset:] = emb
        mask[r, offset:] = 1
        columns, groups[r] = _named_columns(model.layout(len(gen.question_ids)), offset)
    cols = [columns[name] for name in positions]  # the same in every row (see the module docstring)
    qcols = [columns[name] for name in queries]
    onehot = (torch.nn.functional.one_hot(groups.clamp(min=0), len(keys)).float() * (groups >= 0)[..., None]).to(model.device)  # [b, width, keys]
    res: dict[int, Tensor] = {}
    att: dict[int, Tensor] = {}

    def grab_resid(act: Tensor, hook, layer: int) -> None:
        res[layer] = act[:, cols].float().cpu()

    def grab_pattern(act: Tensor, hook, layer: int) -> None:
        att[layer] = torch.einsum("bhqk,bkg->bhqg", act[:, :, qcols].float(), onehot).cpu()

    hooks = [(layer_hook(layer), partial(grab_resid, layer=layer)) for layer in layers]
    hooks += [(f"blocks.{layer}.attn.hook_pattern", partial(grab_pattern, layer=layer)) for layer in range(model.cfg.n_layers)]
    model.forward(embeds, attention_mask=mask.to(model.device), fwd_hooks=hooks)
    resid = torch.stack([res[layer] for layer in layers], dim=1)
    return gens, resid, torch.stack([att[layer] for layer in range(model.cfg.n_layers)], dim=1)
