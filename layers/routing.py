"""Residual routing beyond the plain residual stream: gated skip connections between layers
(U-net style) and the backout of an early layer's state before the head."""

import torch
from torch import Tensor, nn

from layers.core import GATE_CHANNELS, gate_input, make_param


class SkipConnections(nn.Module):
    """(source, target) pairs: the state after layer ``source`` is added to the stream before
    layer ``target``, scaled by sigmoid(lambda) * 2 sigmoid(w . x0[:12])."""

    def __init__(self, pairs: tuple, lambda_init: float):
        super().__init__()
        self.sources = {src: i for i, (src, _) in enumerate(pairs)}
        self.targets = {dst: i for i, (_, dst) in enumerate(pairs)}
        self.lambdas = make_param(torch.full((len(pairs),), lambda_init), "scalar", wd_mul=0.0)
        self.gates = make_param(torch.zeros(len(pairs), GATE_CHANNELS), "gate")

    def arrive(self, layer: int, x: Tensor, x0: Tensor, saved: dict) -> Tensor:
        """Before ``layer``: add the skip that targets it, if any."""
        if layer not in self.targets:
            return x
        i = self.targets[layer]
        strength = torch.sigmoid(self.lambdas[i]) * 2 * torch.sigmoid(
            gate_input(x0) @ self.gates[i].type_as(x0))
        return x + strength[..., None] * saved.pop(i)

    def leave(self, layer: int, x: Tensor, saved: dict) -> None:
        """After ``layer``: keep its state if a skip starts there."""
        if layer in self.sources:
            saved[self.sources[layer]] = x


class Backout(nn.Module):
    """Subtract lambda * (the state after ``layer``) from the final state before the head."""

    def __init__(self, layer: int, lambda_init: float):
        super().__init__()
        self.layer = layer
        self.strength = make_param(torch.tensor([lambda_init]), "scalar", wd_mul=0.0)

    def forward(self, x: Tensor, saved: Tensor) -> Tensor:
        return x - self.strength.type_as(x) * saved
