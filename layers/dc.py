"""Lightweight dynamically composable multi-head attention, post-softmax only (DC-MHA,
modded-nanogpt #315): each query mixes the attention patterns of all heads and adds the mixed
pattern's read of every head's values, over a short window.

    P_h[t, s] = softmax over s of (scale q_h[t] . k_h[s]),  s in t's document, 0 <= t - s < W
    A[t, s]   = sum_h w1[t, h] P_h[t, s]        (w1 RMS-normalised over the heads)
    y_h[t]   += w2[t, h] sum_s A[t, s] v_h[s]

w1 and w2 are per token and head (from the model's gate network); w2 = 0 at init, so the
correction starts switched off. FlexAttention cannot mix heads after the softmax, so this is
its own computation: the window is at most one attention block, so each block of queries
reads the keys of its own block and the one before, as small dense batched matmuls that
torch.compile fuses (the record has Triton kernels for it). The softmax here is over its own
W keys, not a slice of the layer's attention probabilities.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

W1_NORM_EPS = 1e-6


def dc_correction(q: Tensor, k: Tensor, v: Tensor, w1: Tensor, w2: Tensor, docs: Tensor,
                  scale: Tensor, window: int, block: int) -> Tensor:
    """The correction to add to the attention output, (1, T, H, d). q, k, v: (1, T, H, d); w1,
    w2: (1, T, H); docs: (T,) document ids; window <= block, T a multiple of block."""
    _, T, H, d = q.shape
    n = T // block
    w1 = F.rms_norm(w1.float(), (H,), eps=W1_NORM_EPS)

    def with_previous_block(x):  # (n, 2 * block, ...): the block before, then the block
        blocks = x.reshape(n, block, *x.shape[1:])
        return torch.cat([torch.cat([torch.zeros_like(blocks[:1]), blocks[:-1]]), blocks], 1)

    queries = q[0].float().reshape(n, block, H, d)
    keys, values = with_previous_block(k[0].float()), with_previous_block(v[0].float())
    scores = torch.einsum("nqhd,nkhd->nhqk", queries, keys) * scale.float()
    arange = torch.arange(2 * block, device=q.device)
    key_at = (torch.arange(n, device=q.device)[:, None] - 1) * block + arange[None, :]
    query_at = torch.arange(T, device=q.device).reshape(n, block)
    back = query_at[:, :, None] - key_at[:, None, :]
    allowed = ((key_at[:, None, :] >= 0) & (back >= 0) & (back < window)
               & (docs[query_at][:, :, None] == docs[key_at.clamp_min(0)][:, None, :]))
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    mixed = torch.einsum("nhqk,nqh->nqk", probs, w1[0].reshape(n, block, H))
    read = torch.einsum("nqk,nkhd->nqhd", mixed, values)
    return (read * w2[0].float().reshape(n, block, H, 1)).reshape(1, T, H, d).type_as(v)
