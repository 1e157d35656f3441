"""An independent CODI implementation in plain `transformers` + `peft` for the tests.

It shares no code with `interp/`: LoRA stays unmerged (peft computes it), there is no KV cache
(every step recomputes the whole sequence), and activations are read with PyTorch forward hooks
on the HF decoder layers. Slow and obviously correct is the point.
"""

from __future__ import annotations

import re

import torch
from torch import nn


class ReferenceCodi(nn.Module):
    """The state_dict of this module is an official CODI checkpoint: keys `codi.*` and `prj.*`."""

    def __init__(self, codi: nn.Module, prj: nn.Module):
        super().__init__()
        self.codi = codi
        self.prj = prj

    @property
    def hf_model(self):
        """The LlamaForCausalLM inside (peft-wrapped or not); used for its layers and embeddings."""
        return self.codi.get_base_model() if hasattr(self.codi, "get_base_model") else self.codi

    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.hf_model.get_input_embeddings()(torch.tensor([ids]))

    def final_state(self, embeds: torch.Tensor) -> torch.Tensor:
        """hidden_states[-1] (after the final norm) at the last position, full recompute."""
        out = self.codi(inputs_embeds=embeds, output_hidden_states=True)
        return out.hidden_states[-1][:, -1]

    @torch.no_grad()
    def generate(self, question_ids: list[int], *, bot: int, eot: int, eos: int, num_latents: int, max_new_tokens: int):
        """The official loop. Returns (latents [K, d], answer ids up to and including eos)."""
        embeds = self.embed(question_ids + [bot])
        latents = []
        for _ in range(num_latents):
            latent = self.prj(self.final_state(embeds))[:, None]
            latents.append(latent[0, 0])
            embeds = torch.cat([embeds, latent], dim=1)
        embeds = torch.cat([embeds, self.embed([eot])], dim=1)
        answer = []
        for _ in range(max_new_tokens):
            logits = self.codi(inputs_embeds=embeds).logits[0, -1, :eot]
            token = int(logits.argmax())
            answer.append(token)
            if token == eos:
                break
            embeds = torch.cat([embeds, self.embed([token])], dim=1)
        return torch.stack(latents), answer

    @torch.no_grad()
    def layer_outputs(self, embeds: torch.Tensor) -> list[torch.Tensor]:
        """Each decoder layer's output [pos, d] for a full pass over embeds [1, pos, d]."""
        outputs: list[torch.Tensor] = []
        handles = [
            layer.register_forward_hook(lambda mod, args, out: outputs.append((out[0] if isinstance(out, tuple) else out)[0]))
            for layer in self.hf_model.model.layers
        ]
        try:
            self.codi(inputs_embeds=embeds)
        finally:
            for h in handles:
                h.remove()
        return outputs

    def sequence_embeds(self, question_ids: list[int], latents: torch.Tensor, tail_ids: list[int], *, bot: int, eot: int):
        """Embeddings of [question, bot, latents, eot, tail]."""
        return torch.cat(
            [self.embed(question_ids + [bot]), latents[None], self.embed([eot] + tail_ids)], dim=1
        )


def last_number(text: str) -> float | None:
    found = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(found[-1]) if found else None
