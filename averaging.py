"""Tail weight averaging: record #92's TailEMA ship (modded-nanogpt PR #360, "ANVIL2").

Over the last ``window`` steps of the schedule an exponential moving average of the lm_head
and the embedding is kept in float32, at rate r = 2 / (window + 1) per step; after the last
step it is blended into the weights, w <- w + blend (average - w), and each weight is scaled
back to its Frobenius norm before the blend (the record's "decontraction"). Validation and the
saved model then see the blended weights.

Adam moves these two on odd steps only (``schedule.adam_every = 2``), so the average is
updated there, one update for two steps at rate 1 - (1 - r)^2, seeded with the weights at the
window's first step and updated at plain rate r on a last odd step: the record's cadence,
computed the same way (tests/test_averaging.py against the record's own code).

The record's other ships (its tail average and bank blend of the ANVIL matrices, the value
embeddings' average) need its optimizer and parameter banks: not here.
"""

import math

import torch
from torch import Tensor

PARAMETERS = ("lm_head", "embed")


class TailEMA:
    """The average of ``params`` (name -> parameter) over the last ``window`` of
    ``total_steps`` steps; ``tick(step)`` after each step's optimizer update, ``ship()`` after
    the last."""

    def __init__(self, params: dict, window: int, blend: float, total_steps: int):
        self.params, self.window, self.blend, self.total = params, window, blend, total_steps
        self.averages: dict[str, Tensor] = {}

    def rate(self, step: int) -> float | None:
        """The update's rate after optimizer step ``step`` (0-based), None for no update."""
        if step < self.total - self.window:
            return None
        r = 2.0 / (self.window + 1)
        if step % 2 == 0:  # Adam did not move the weights: only the window's first step seeds
            return r if step == self.total - self.window else None
        return r if step == self.total - 1 else -math.expm1(2.0 * math.log1p(-r))

    @torch.no_grad()
    def tick(self, step: int) -> None:
        rate = self.rate(step)
        if rate is None:
            return
        for name, param in self.params.items():
            if name not in self.averages:
                self.averages[name] = param.detach().float().clone()
            else:
                self.averages[name].lerp_(param.detach().float(), rate)

    @torch.no_grad()
    def ship(self) -> list[str]:
        """Blend the averages into the weights, each weight kept at its norm; returns the names
        shipped (none before the window has begun)."""
        shipped = list(self.averages)
        for name in shipped:
            param = self.params[name]
            norm = param.float().norm()
            blended = torch.lerp(param.float(), self.averages.pop(name), self.blend)
            current = blended.norm()
            param.copy_(blended * torch.where(current > 0, norm / current, 1.0).item())
        return shipped

    def state_dict(self) -> dict:
        return {name: average.clone() for name, average in self.averages.items()}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - set(self.params)
        if unknown:
            raise ValueError(f"tail EMA state for unknown parameters {sorted(unknown)}")
        self.averages = {name: value.float().to(self.params[name].device).clone()
                         for name, value in state.items()}
