"""Hook names and hooks at absolute positions.

CODI runs in chunks (the prompt, one latent per step, then eot and the answer), so a plain
TransformerLens hook function sees chunk-relative positions. `at_positions(fn, positions)` marks a
hook function to be applied at absolute sequence positions: `LatentModel.forward` binds it to each
chunk (knowing the chunk's first absolute position and each row's left padding) and calls `fn` on
the activations of exactly those positions, `[batch, len(positions in chunk), ...]`, writing back
what it returns (or what it changed in place).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from transformer_lens.utils import get_act_name

HookFn = Callable[[Tensor, Any], Tensor | None]
Hook = tuple[str, Callable]
#: hooks whose second axis is not the sequence position (patterns, scores, keys after the KV join)
NOT_POSITIONAL = ("hook_pattern", "hook_attn_scores", "hook_rot_k", "hook_rot_q")
HEAD_HOOKS = ("hook_z", "hook_q", "hook_k", "hook_v", "hook_result")
FAMILIES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "result", "pattern", "attn_scores")


def layer_of(hook: str) -> int | None:
    """`blocks.3.hook_resid_post` -> 3; hooks outside the blocks -> None (the one parser of hook names' layers)."""
    parts = hook.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else None


def hook_name(hook: str | tuple[str, int]) -> str:
    """A full TransformerLens hook name from a name or a `(name, layer)` tuple (as `get_act_name`)."""
    if isinstance(hook, tuple):
        if len(hook) != 2 or not isinstance(hook[1], int):
            raise ValueError(f"a hook tuple is (name, layer), e.g. ('resid_post', 3); got {hook!r}")
        return get_act_name(hook[0], hook[1])
    if not isinstance(hook, str):
        raise TypeError(f"hook must be a TransformerLens hook name or a (name, layer) tuple, not {type(hook).__name__}")
    if hook.removeprefix("hook_") in FAMILIES:
        raise ValueError(f"{hook!r} names a hook family, not one hook: give a layer, e.g. ({hook.removeprefix('hook_')!r}, 3) or 'blocks.3.hook_{hook.removeprefix('hook_')}'")
    return hook


@dataclass(frozen=True)
class PositionalHook:
    """A hook function applied at absolute sequence positions (see `at_positions`)."""

    fn: HookFn
    positions: tuple[int, ...]

    def bind(self, start: int, length: int, offsets: Sequence[int] | None = None) -> HookFn | None:
        """A plain hook function for the chunk of columns [start, start + length), or None if the
        chunk holds none of the positions. `offsets[r]` is row r's left padding (column = position + offset)."""
        offsets = list(offsets) if offsets is not None else [0]
        columns = [[p + off - start for p in self.positions if 0 <= p + off - start < length] for off in offsets]
        if not any(columns):
            return None
        fn = self.fn

        def bound(act: Tensor, hook) -> Tensor:
            if hook.name.endswith(NOT_POSITIONAL):
                raise ValueError(f"at_positions cannot act on {hook.name}: its second axis is not the sequence position")
            act = act.clone()  # never in place: at blocks.0.hook_resid_pre the activation is the fed input itself
            same = all(c == columns[0] for c in columns)
            groups = [(slice(None), columns[0])] if same else [(slice(r, r + 1), c) for r, c in enumerate(columns) if c]
            for rows, cols in groups:
                sub = act[rows, cols]
                out = fn(sub, hook)
                act[rows, cols] = sub if out is None else out
            return act

        return bound


def at_positions(fn: HookFn, positions: int | Sequence[int]) -> PositionalHook:
    """Apply the TransformerLens hook function `fn(activation, hook)` at absolute `positions` only.

    `fn` gets `activation[:, positions in this chunk]` ([batch, n, ...]) and returns the new values
    (or None after changing them in place). Use it in `fwd_hooks` of `LatentModel.generate`, `trace`,
    `run_with_hooks` and `run_with_cache`.
    """
    positions = (positions,) if isinstance(positions, int) else tuple(int(p) for p in positions)
    if any(p < 0 for p in positions):
        raise ValueError(f"at_positions takes absolute positions >= 0, got {positions}")
    return PositionalHook(fn, positions)


def bind_hooks(hooks: Sequence[Hook], start: int, length: int, offsets: Sequence[int] | None = None) -> list[Hook]:
    """Plain TransformerLens hooks for one chunk: positional hooks bound to it, others as given."""
    out = []
    for name, fn in hooks:
        if isinstance(fn, PositionalHook):
            bound = fn.bind(start, length, offsets)
            if bound is not None:
                out.append((name, bound))
        else:
            out.append((name, fn))
    return out
