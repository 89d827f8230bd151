"""Causal self-attention of the speedrun: merged QKVO weights, QK norm, rotary, value
embeddings with a gate, a per-head output gate; FlexAttention on CUDA, SDPA on the CPU."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from layers.core import GATE_CHANNELS, gate_input, make_param, norm, uniform_matrix
from layers.rotary import apply_rotary


class CausalSelfAttention(nn.Module):
    def __init__(self, config, value_embed: bool):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        hdim, dim = config.num_heads * config.head_dim, config.model_dim
        # W_q, W_k, W_v, W_o in one tensor so the matrix optimizer sees four (hdim, dim) matrices
        qkvo = uniform_matrix(4, hdim, dim, std_scale=config.init_std, fan_in=dim)
        qkvo[3].zero_()  # zero output projection: each block starts as the identity
        self.qkvo = make_param(qkvo, "attn")
        self.out_gate = make_param(torch.zeros(config.num_heads, GATE_CHANNELS), "gate") \
            if config.attn_gate else None
        self.value_gate = make_param(torch.zeros(config.num_heads, GATE_CHANNELS), "gate") \
            if value_embed else None

    def forward(self, x, ve, mask, rotary, scale):
        """x (1, T, D); ve the value embedding (1, T, H * head_dim) or None; mask a BlockMask
        (FlexAttention) or a dense boolean mask (SDPA); rotary the (cos, sin) tables."""
        T = x.size(1)
        q, k, v = F.linear(x, self.qkvo[:3].flatten(0, 1).type_as(x)).view(
            1, T, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = apply_rotary(norm(q), *rotary), apply_rotary(norm(k), *rotary)
        if self.value_gate is not None:
            # 2 * sigmoid(0) = 1: the value embedding is added at full strength at the start
            gate = 2 * torch.sigmoid(F.linear(gate_input(x), self.value_gate.type_as(x)))
            v = v + gate[..., None] * ve.view_as(v)
        q, k, v = (t.transpose(1, 2) for t in (q * scale.type_as(q), k, v))
        if isinstance(mask, BlockMask):
            y = flex_attention(q, k, v, block_mask=mask, scale=1.0)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        y = y.transpose(1, 2)
        if self.out_gate is not None:
            # sigmoid(0) = 0.5: every head starts at half strength, the same for all heads
            y = y * torch.sigmoid(F.linear(gate_input(x), self.out_gate.type_as(x)))[..., None]
        return y.flatten(2) @ self.qkvo[3].type_as(y)
