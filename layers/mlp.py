"""The MLP: up projection, activation (relu^2 in the speedrun), zero-initialised down
projection; both matmuls in float8 where ``fp8_mlp`` and the GPU allow (``kernels.linear``), or
with ``fused``, record #89's relu^2 MLP (``kernels.relu2_mlp``: float8 forward with relu^2 in the
up projection's epilogue, bf16 backward)."""

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
    def __init__(self, config, proj_lr_mul: float, fused: bool = False):
        """``proj_lr_mul``: the (dim, hidden) down projection gets no shape boost in the matrix
        optimizer, unlike the (hidden, dim) up projection; hidden/dim^0.5 restores parity.
        ``fused`` (relu2 only, with fp8_mlp): ``kernels.relu2_mlp`` where
        ``kernels.use_relu2_mlp`` allows (elsewhere the plain path, as fp8_mlp's);
        its hidden activation's float8 scale, from the previous call, is a buffer (in
        checkpoints, so that a resumed run goes on with it)."""
        super().__init__()
        dim, hidden = config.model_dim, config.ffn_dim
        width = 2 * hidden if config.activation in GATED_ACTIVATIONS else hidden
        self.activation = ACTIVATIONS[config.activation]
        self.fp8 = config.fp8_mlp
        self.fc = make_param(uniform_matrix(width, dim, std_scale=config.init_std, fan_in=dim),
                             "mlp")
        self.proj = make_param(torch.zeros(dim, hidden), "mlp", lr_mul=proj_lr_mul)
        self.fused = fused and self.fp8
        if self.fused:
            self.register_buffer("act_scale", torch.ones(()))

    def forward(self, x):
        if self.fused and kernels.use_relu2_mlp(x, self.fc, self.proj):
            out, next_scale = kernels.relu2_mlp(x, self.fc, self.proj, self.act_scale)
            self.act_scale.copy_(next_scale)
            return out
        fc = kernels.linear(x, self.fc, self.fp8)
        return kernels.linear(self.activation(fc), self.proj, self.fp8)
