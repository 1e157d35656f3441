"""Interventions: what a patch writes at its site, as data.

An intervention turns the activation a run is about to use at a site into the one it uses instead.
The engine calls it once per hook per forward chunk on all the (row, position[, head]) entries
that chunk patches:

    new = intervention.apply(act, source)       act, source, new: [n, *site_shape]

`act` is the patched run's own activation there; `source` is what `intervention.source(...)` chose
for that entry, read before the run (by default the clean run's activation at the same position).

- `Clean()`: the clean run's activation (activation patching; the default).
- `Mean(traces)`: the mean activation over `traces` at the same hook and the same *named* position
  (`latent[2]`, `eot`, ...), so traces of questions of different lengths average correctly:
  mean-latent patching as in the published CODI studies.
- `Zero()`: zeros (zero ablation).
- `Add(vector, scale)`: act + scale * vector (steering); the vector has the site's trailing shape.
- any callable `fn(activation, clean_activation) -> activation`, applied to [n, *site_shape]
  tensors (wrapped in `Custom`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from interp.model import Trace


class Intervention:
    """Base class: `source` picks what is read before the run, `apply` writes during it."""

    def source(self, clean: Trace, hook: str, position: int, head: int | None) -> Tensor:
        """The value [*site_shape] an entry needs, read from the clean trace (default: its activation)."""
        value = clean.cache[hook][0, position]
        return value if head is None else value[head]

    def apply(self, act: Tensor, source: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        """A short name for result files and run.json."""
        return type(self).__name__.lower()


@dataclass(frozen=True)
class Clean(Intervention):
    """Write the clean run's activation (activation patching)."""

    def apply(self, act: Tensor, source: Tensor) -> Tensor:
        return source.to(act.dtype)


@dataclass(frozen=True)
class Zero(Intervention):
    """Write zeros (zero ablation)."""

    def apply(self, act: Tensor, source: Tensor) -> Tensor:
        return torch.zeros_like(act)


@dataclass(frozen=True)
class Add(Intervention):
    """Add `scale * vector` to the activation (steering); `vector` has the site's trailing shape."""

    vector: Tensor
    scale: float = 1.0

    def apply(self, act: Tensor, source: Tensor) -> Tensor:
        if self.vector.shape != act.shape[1:]:
            raise ValueError(f"Add: vector of shape {tuple(self.vector.shape)} does not fit activations of shape {tuple(act.shape[1:])} at this site")
        return act + self.scale * self.vector.to(act)

    def describe(self) -> str:
        return f"add(scale={self.scale})"


@dataclass
class Mean(Intervention):
    """Write the mean activation over `traces` at the same hook and the same named position."""

    traces: Sequence[Trace]
    _means: dict[tuple[str, str, int | None], Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.traces) == 0:
            raise ValueError("Mean needs at least one trace to average over")

    def source(self, clean: Trace, hook: str, position: int, head: int | None) -> Tensor:
        name = clean.layout.name(position)
        key = (hook, name, head)
        if key not in self._means:
            values = []
            for trace in self.traces:
                try:
                    p = trace.layout.position(name)
                except KeyError:
                    raise ValueError(f"Mean: a trace has no position {name!r} to average (its positions are {trace.layout.names[:4]}...)") from None
                values.append(trace.cache[hook][0, p].float())
            mean = torch.stack(values).mean(0).to(values[0].device)
            self._means[key] = mean if head is None else mean[head]
        return self._means[key]

    def apply(self, act: Tensor, source: Tensor) -> Tensor:
        return source.to(act.dtype)

    def describe(self) -> str:
        return f"mean(n={len(self.traces)})"


@dataclass(frozen=True)
class Custom(Intervention):
    """A user function `fn(activation, clean_activation) -> activation` on [n, *site_shape] tensors."""

    fn: Callable[[Tensor, Tensor], Tensor]

    def apply(self, act: Tensor, source: Tensor) -> Tensor:
        out = self.fn(act, source.to(act.dtype))
        if not isinstance(out, Tensor) or out.shape != act.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"intervention function must return a tensor of shape {tuple(act.shape)}, got {got}")
        return out

    def describe(self) -> str:
        return getattr(self.fn, "__name__", "custom")


INTERVENTIONS = {"clean": Clean, "zero": Zero, "mean": Mean}


def as_intervention(x: Intervention | Callable | None) -> Intervention:
    """None -> Clean(); a callable -> Custom(fn); an Intervention as is."""
    if x is None:
        return Clean()
    if isinstance(x, Intervention):
        return x
    if callable(x):
        return Custom(x)
    raise TypeError(f"intervention must be an interp Intervention (Clean, Mean, Zero, Add) or a callable, not {type(x).__name__}")
