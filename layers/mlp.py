"""The MLP: up projection, activation (relu^2 in the speedrun), zero-initialised down
projection; both matmuls in float8 where ``fp8_mlp`` and the GPU allow (``kernels.linear``)."""

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from layers.core import make_param, uniform_matrix

ACTIVATIONS = {
    "relu2": lambda x: F.relu(x).square(),
    "gelu": F.gelu,
    "silu": F.silu,
    "swiglu": lambda x: F.silu(x[..., 0::2]) * x[..., 1::2],
    "geglu": lambda x: F.gelu(x[..., 0::2]) * x[..., 1::2],
}
GATED_ACTIVATIONS = ("swiglu", "geglu")


class MLP(nn.Module):
    def __init__(self, config, proj_lr_mul: float):
        """``proj_lr_mul``: the (dim, hidden) down projection gets no shape boost in the matrix
        optimizer, unlike the (hidden, dim) up projection; hidden/dim^0.5 restores parity."""
        super().__init__()
        dim, hidden = config.model_dim, config.ffn_dim
        width = 2 * hidden if config.activation in GATED_ACTIVATIONS else hidden
        self.activation = ACTIVATIONS[config.activation]
        self.fp8 = config.fp8_mlp
        self.fc = make_param(uniform_matrix(width, dim, std_scale=config.init_std, fan_in=dim),
                             "mlp")
        self.proj = make_param(torch.zeros(dim, hidden), "mlp", lr_mul=proj_lr_mul)

    def forward(self, x):
        fc = kernels.linear(x, self.fc, self.fp8)
        return kernels.linear(self.activation(fc), self.proj, self.fp8)
