"""Dense connections and gates computed from the residual stream (MUDD, modded-nanogpt #259 and
#315): small two-layer networks that turn a token's state into per-token coefficients.

* ``GateNetworks``: two of them, one reading the normed embedding before the first layer
  ("pre"), one reading the stream where a later layer begins ("post"). Their outputs are
  every per-token gate the layers use: XSA strengths, attention output gates, how much of
  x0 and of the bigram embedding each layer adds back, the skip's gate and DC's head mixes.
  ``GateLayout`` says which channel feeds what; the coefficients share one learnable scale.
* ``CoefficientNet`` alone (fixed scale 0.1): the dense connections of the last layer, which
  mixes the saved states of earlier layers into its input, its values and its output, and of
  the final state before the head.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.core import make_param

# initial outputs (before the scale) of the gate channels: at 0.1, gates of 0.25, bigram
# gates of 0.05, a skip gate of 0.5, DC's w1 of 1 (its w2 starts at 0: DC off)
GATE_BIAS = {"xsa": 0.0, "attn_gate": 2.5, "x0": 0.0, "bigram": 0.5, "skip": 5.0,
             "dc_w1": 10.0, "dc_w2": 0.0}
GATE_SCALE = 0.1
MUDD_SCALE = 0.1


class CoefficientNet(nn.Module):
    """(gelu(x W1^T) W2^T + b) per token; W2 starts at zero, so the coefficients at init are
    the bias. With ``groups`` (record #92's final mix) each coefficient gets a delta per
    channel group, from weights W2g that also start at zero: (1, T, n, groups)."""

    def __init__(self, dim: int, hidden: int, bias: Tensor, label: str, groups: int = 0):
        super().__init__()
        bound = 1 / math.sqrt(dim)  # kaiming_uniform with a = sqrt(5), as nn.Linear
        self.w1 = make_param(torch.empty(hidden, dim).uniform_(-bound, bound), label)
        self.w2 = make_param(torch.zeros(len(bias), hidden), label)
        self.bias = make_param(bias.clone(), label, wd_mul=0.0)
        self.w2g = make_param(torch.zeros(len(bias), groups, hidden), label) if groups else None

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.gelu(F.linear(x, self.w1.type_as(x)))
        out = F.linear(hidden, self.w2.type_as(x), self.bias.type_as(x))
        if self.w2g is None:
            return out
        return out[..., None] + torch.einsum("...h,ngh->...ng", hidden, self.w2g.type_as(x))


class GateLayout:
    """Where each layer finds its gates: (network, first channel, channels) by (kind, layer).

    Layers before ``post_gate_layer`` read the pre network, the others the post one. In each,
    in this order: the XSA strengths of its XSA layers (a channel per head), the output gates
    of its gated layers (per head), each layer's x0 then bigram gate (layer 0's bigram gate
    scales the bigram embedding added before it), a skip gate for each skip layer, DC's w1 then
    w2 (per head) for its DC layers."""

    def __init__(self, config):
        self.slots, sizes = {}, [0, 0]
        heads = config.num_heads
        injected = sorted(set(config.x0_layers) | set(config.bigram_layers))
        kinds = [("xsa", config.xsa_layers, heads), ("attn_gate", config.attn_gate_layers, heads),
                 ("inject", injected, 0), ("skip", config.skip_layers, 1),
                 ("dc", config.dc_layers, 2 * heads)]
        for kind, layers, width in kinds:
            for layer in layers:
                net = int(layer >= config.post_gate_layer)
                if kind == "inject":
                    for name, named in (("x0", config.x0_layers),
                                        ("bigram", config.bigram_layers)):
                        if layer in named:
                            self.slots[name, layer] = (net, sizes[net], 1)
                            sizes[net] += 1
                    continue
                if kind == "dc":
                    self.slots["dc_w1", layer] = (net, sizes[net], heads)
                    self.slots["dc_w2", layer] = (net, sizes[net] + heads, heads)
                else:
                    self.slots[kind, layer] = (net, sizes[net], width)
                sizes[net] += width
        self.sizes = tuple(sizes)

    def biases(self):
        biases = [torch.zeros(n) for n in self.sizes]
        for (kind, _), (net, start, width) in self.slots.items():
            biases[net][start:start + width] = GATE_BIAS[kind]
        return biases

    def get(self, gates: list, kind: str, layer: int):
        """The (1, T, width) gate of ``kind`` for ``layer`` (a (1, T, 1) scalar for width 1),
        or None if the layer has none."""
        if (kind, layer) not in self.slots:
            return None
        net, start, width = self.slots[kind, layer]
        return gates[net][..., start:start + width]


class GateNetworks(nn.Module):
    def __init__(self, config, layout: GateLayout):
        super().__init__()
        self.layout = layout
        self.nets = nn.ModuleList(
            [CoefficientNet(config.model_dim, config.gate_hidden, bias, "mudd_gate")
             for bias in layout.biases()])
        self.scale = make_param(torch.tensor(GATE_SCALE), "mudd_gate", wd_mul=0.0)

    def forward(self, net: int, x: Tensor) -> Tensor:
        return self.nets[net](x) * self.scale.type_as(x)
