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

    def new_cache(self):
        return KVCache()

    def forward(self, x, ve, mask, rotary, scale, cache=None):
        """x (1, T, D); ve the value embedding (1, T, H * head_dim) or None; mask a BlockMask
        (FlexAttention) or a dense boolean mask (SDPA); rotary the (cos, sin) tables.

        Decoding (``cache``, this layer's ``new_cache()``): x holds the new tokens only, their
        keys and values join the cache, and the queries attend to the last mask.size(-1) keys
        of it (``layers.masks.attention_rows``)."""
        T = x.size(1)
        q, k, v = F.linear(x, self.qkvo[:3].flatten(0, 1).type_as(x)).view(
            1, T, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = apply_rotary(norm(q), *rotary), apply_rotary(norm(k), *rotary)
        if self.value_gate is not None:
            # 2 * sigmoid(0) = 1: the value embedding is added at full strength at the start
            gate = 2 * torch.sigmoid(F.linear(gate_input(x), self.value_gate.type_as(x)))
            v = v + gate[..., None] * ve.view_as(v)
        q, k, v = (t.transpose(1, 2) for t in (q * scale.type_as(q), k, v))
        if cache is not None:
            k, v = (t[:, :, -mask.size(-1):] for t in cache.extend(k, v))
        if isinstance(mask, BlockMask):
            y = flex_attention(q, k, v, block_mask=mask, scale=1.0)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        y = y.transpose(1, 2)
        if self.out_gate is not None:
            # sigmoid(0) = 0.5: every head starts at half strength, the same for all heads
            y = y * torch.sigmoid(F.linear(gate_input(x), self.out_gate.type_as(x)))[..., None]
        return y.flatten(2) @ self.qkvo[3].type_as(y)


class KVCache:
    """One attention layer's keys and values of the tokens decoded so far, (1, H, T, head_dim)
    each, in buffers that double when full, so that appending a token costs no copy of the
    sequence."""

    def __init__(self):
        self.keys = self.values = None
        self.length = 0

    def extend(self, k, v):
        """Append (1, H, n, head_dim) keys and values; returns all of them so far."""
        end = self.length + k.size(2)
        if self.keys is None or end > self.keys.size(2):
            size = max(end, 2 * self.length)
            grown = [t.new_empty(*t.shape[:2], size, t.size(3)) for t in (k, v)]
            if self.keys is not None:
                for new, old in zip(grown, (self.keys, self.values), strict=True):
                    new[:, :, :self.length] = old[:, :, :self.length]
            self.keys, self.values = grown
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]
