"""The MLP: up projection, activation (relu^2 in the speedrun), zero-initialised down
projection; both matmuls in float8 where ``fp8_mlp`` and the GPU allow (``kernels.linear``),
for relu^2 optionally with record #92's delayed scales for the hidden activation and its
gradient (``kernels.float8_relu2_mlp``), or with ``fused``, record #89's relu^2 MLP
(``kernels.relu2_mlp``: float8 forward with relu^2 in the up projection's epilogue, bf16
backward)."""

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
# the delayed float8 scales of ``delayed``: the hidden activation (e4m3) and its gradient at
# pre, the up projection's output (e5m2)
DELAYED = (("post", torch.float8_e4m3fn), ("grad", torch.float8_e5m2))


class MLP(nn.Module):
    def __init__(self, config, proj_lr_mul: float, fused: bool = False, delayed: bool = False):
        """``proj_lr_mul``: the (dim, hidden) down projection gets no shape boost in the matrix
        optimizer, unlike the (hidden, dim) up projection; hidden/dim^0.5 restores parity.
        ``fused`` (relu2 only, with fp8_mlp): ``kernels.relu2_mlp`` where
        ``kernels.use_relu2_mlp`` allows (elsewhere the plain path, as fp8_mlp's);
        its hidden activation's float8 scale, from the previous call, is a buffer (in
        checkpoints, so that a resumed run goes on with it). ``delayed`` (relu2 with fp8_mlp, not
        fused): ``kernels.float8_relu2_mlp`` where ``kernels.use_relu2_mlp`` allows, the hidden
        activation and its gradient at pre cast at delayed scales, buffers too, which
        ``refresh_scales`` moves on once a step."""
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
        self.delayed = delayed and self.fp8 and not self.fused and config.activation == "relu2"
        if self.delayed:
            for name, dtype in DELAYED:
                self.register_buffer(f"{name}_scale",
                                     torch.tensor(kernels.DELAYED_SCALING[dtype][2]))
                self.register_buffer(f"{name}_amax", torch.zeros(()))

    def forward(self, x):
        if self.fused and kernels.use_relu2_mlp(x, self.fc, self.proj):
            out, next_scale = kernels.relu2_mlp(x, self.fc, self.proj, self.act_scale)
            self.act_scale.copy_(next_scale)
            return out
        if self.delayed and kernels.use_relu2_mlp(x, self.fc, self.proj):
            return kernels.float8_relu2_mlp(x, self.fc, self.proj,
                                            (self.post_scale, self.post_amax),
                                            (self.grad_scale, self.grad_amax))
        fc = kernels.linear(x, self.fc, self.fp8)
        return kernels.linear(self.activation(fc), self.proj, self.fp8)

    def refresh_scales(self):
        """The delayed scales for the next step from this step's amax (``delayed`` only)."""
        for name, dtype in DELAYED:
            kernels.refresh_scale_(getattr(self, f"{name}_scale"), getattr(self, f"{name}_amax"),
                                   dtype)
