"""Causal self-attention: record #55's (``CausalSelfAttention``: merged QKVO weights, QK norm,
rotary, gated value embeddings, a per-head sigmoid output gate) and record #89's
(``GatedAttention``). FlexAttention on CUDA, SDPA with the equivalent dense mask on the CPU."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import kernels
from layers.core import GATE_CHANNELS, gate_input, make_param, norm, uniform_matrix
from layers.dc import dc_correction
from layers.rotary import apply_rotary, apply_rotary_interleaved


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


class GatedAttention(nn.Module):
    """Record #89's attention layer: Q and K per head pair and V, O as separate matrices for
    the matrix optimizer, QK norm, rotary with adjacent pairs, and these per-layer pieces:

    * paired heads (#191): the sequence is doubled and heads h and h + H/2 of token t sit in
      rows 2t and 2t + 1, so each attends to the other's keys as well as its own (head h
      rotated at position 2t + h mod 2); the window then counts rows;
    * key offset (long windows): the unrotated half of each key is the previous token's, so
      a query can match on what came just before a token;
    * value residual: ``aux_v`` (a gated value embedding, or the dense connections of the
      last layer) added to the values;
    * DC (``layers/dc.py``), gated XSA (#264 in the algebraic form of #317: the output loses
      the share tanh(alpha) of its component along its own token's value) and a linear
      output gate, each taking per-token coefficients from the model's gate networks;
    * learnable scales lambda_q (on Q, K, V) and lambda_o (on the output projection);
    * record #92's mixed widths: Q/K heads of ``qk_dim`` (every dim rotating on a narrow layer)
      and V/O of ``v_dim``, read from the full-width weights;
    * with ``fp8_attn``, the projections in float8 where the GPU has it (``kernels.linear``).
    """

    def __init__(self, config, paired: bool, key_offset: bool, value_gate: bool,
                 qk_dim: int = 0, v_dim: int = 0):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        # record #92's narrow heads: Q and K (qk_dim), V and O (v_dim) narrower than head_dim.
        # The weights keep the full width, the layer reads the first qk_dim (v_dim) rows of
        # each head (O: columns), as the record's banks do: the optimizer then sees the
        # record's matrices, whose unread rows get no gradient
        self.qk_dim, self.v_dim = qk_dim or self.head_dim, v_dim or self.head_dim
        self.paired, self.key_offset = paired, key_offset
        self.fp8 = config.fp8_attn  # the projections through kernels.linear
        hdim, dim = config.num_heads * config.head_dim, config.model_dim
        qk = make_param(uniform_matrix(2 * hdim, dim, std_scale=config.init_std, fan_in=dim),
                        "attn")
        qk.matrix_shape = (2 * self.head_dim, dim)  # orthogonalised per head pair (#253)
        self.qk = qk
        self.vo = make_param(uniform_matrix(2, hdim, dim, std_scale=config.init_std,
                                            fan_in=dim), "attn")
        self.lambdas = make_param(torch.tensor([0.5, 1.0]), "scalar", wd_mul=0.0)
        self.value_gate = make_param(torch.zeros(config.num_heads, GATE_CHANNELS), "gate") \
            if value_gate else None

    def weights(self) -> tuple[Tensor, Tensor]:
        """The Q, K, V rows (2 H qk_dim + H v_dim, D) and the output projection (D, H v_dim)
        that the layer reads."""
        H, d = self.num_heads, self.head_dim
        qk, v, o = self.qk, self.vo[0], self.vo[1]
        if self.qk_dim != d:
            qk = qk.view(2 * H, d, -1)[:, :self.qk_dim].flatten(0, 1)
        if self.v_dim != d:
            v = v.view(H, d, -1)[:, :self.v_dim].flatten(0, 1)
            o = o.view(-1, H, d)[..., :self.v_dim].flatten(1)
        return torch.cat([qk, v]), o

    def gated_value(self, x: Tensor, value_embed: Tensor) -> Tensor:
        """The value embedding scaled per head by 2 sigmoid(w . [x[:6], ve[:6]]): x is the
        layer's normed input, ve its value embedding (1, T, D)."""
        half = GATE_CHANNELS // 2
        features = torch.cat([x[..., :half], value_embed[..., :half]], dim=-1)
        gate = 2 * torch.sigmoid(F.linear(features, self.value_gate.type_as(x)))
        return gate[..., None] * value_embed.view(*x.shape[:2], self.num_heads, self.head_dim)

    def forward(self, x, aux_v, mask, rotary, scale, docs=None, xsa=None, gate=None, dc=None):
        """x (1, T, D) the normed input; aux_v (1, T, H, d) or None; mask for the sequence (for
        the doubled one on a paired layer); rotary the (cos, sin) tables of the rotating pairs
        over 2T positions; xsa (1, T, H) raw alphas, gate (1, T, H), dc (w1, w2, window, block)
        or None. Returns (1, T, D)."""
        T, H, d, dv = x.size(1), self.num_heads, self.qk_dim, self.v_dim
        scale_q, scale_o = self.lambdas.type_as(x)
        qkv_weight, o_weight = self.weights()
        qkv = kernels.linear(x, scale_q * qkv_weight.type_as(x), self.fp8)
        q, k, v = qkv.split([H * d, H * d, H * dv], dim=-1)
        q, k, v = q.view(1, T, H, d), k.view(1, T, H, d), v.view(1, T, H, dv)
        q, k = norm(q), norm(k)
        if aux_v is not None:
            v = v + aux_v[..., :dv]  # a half-width V adds the value's first half
        cos, sin = rotary
        if self.paired:
            # head 2g + b of token t at position 2t + b; rows 2t, 2t + 1 of the doubled sequence
            cos, sin = (table.view(1, T, 1, 2, -1) for table in (cos, sin))
            q, k = (apply_rotary_interleaved(t.view(1, T, H // 2, 2, d), cos, sin)
                    .reshape(1, 2 * T, H // 2, d) for t in (q, k))
            v = v.reshape(1, 2 * T, H // 2, dv)
        else:
            cos, sin = cos[:, :T], sin[:, :T]
            q, k = apply_rotary_interleaved(q, cos, sin), apply_rotary_interleaved(k, cos, sin)
            if self.key_offset:
                k = torch.cat([k[..., :d // 2], torch.cat([k[:, :1, :, d // 2:],
                                                           k[:, :-1, :, d // 2:]], dim=1)], -1)
        y = attend(q, k, v, mask, scale).reshape(1, T, H, dv)
        if dc is not None:
            w1, w2, window, block = dc
            y = y + dc_correction(q, k, v, w1, w2, docs, scale, window, block)
        if xsa is not None:
            along = (y * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True).clamp_min(
                1e-8)
            y = y - torch.tanh(xsa)[..., None] * along * v
        if gate is not None:
            y = y * gate[..., None]
        return kernels.linear(y.flatten(2), scale_o * o_weight.type_as(y), self.fp8)


def attend(q, k, v, mask, scale):
    """Softmax attention of (1, T, H, d) tensors with ``scale``, FlexAttention for a BlockMask,
    SDPA with a dense mask otherwise; returns (1, T, H, d)."""
    q, k, v = (t.transpose(1, 2) for t in (q * scale.type_as(q), k, v))
    if isinstance(mask, BlockMask):
        y = flex_attention(q, k, v, block_mask=mask, scale=1.0)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    return y.transpose(1, 2)


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
