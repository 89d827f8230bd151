"""Attention masks. One rule, two encodings:

    query q may attend key k  <=>  k <= q  and  doc(k) == doc(q)
                                   and  block(q) - block(k) < window (in blocks)

doc(t) counts the BOS tokens up to t, so a document starts at its BOS. On CUDA the rule is a
FlexAttention ``BlockMask`` (block-sparse: whole key blocks are skipped); on the CPU, where
FlexAttention has no backward pass, the same rule is a dense (T, T) boolean mask for
``scaled_dot_product_attention``.
"""

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from data.shards import BOS_ID


def document_ids(inputs: Tensor) -> Tensor:
    return (inputs == BOS_ID).cumsum(0).to(torch.int32)


def dense_attention_mask(docs: Tensor, window_blocks, block_size: int) -> Tensor:
    """The (T, T) boolean mask of the rule above, for scaled_dot_product_attention."""
    return attention_rows(docs, docs.numel(), window_blocks, block_size)


def attention_rows(docs: Tensor, queries: int, window_blocks, block_size: int) -> Tensor:
    """The rule for the last ``queries`` positions of ``docs`` against the keys their windows
    reach: a (queries, width) boolean mask over the last ``width`` positions. All T queries give
    the (T, T) mask; the few of a decoding step give rows no wider than the window plus the
    step's own tokens, however long the sequence grows."""
    first = docs.numel() - queries
    start = 0 if first == 0 else max(0, (first // block_size - window_blocks + 1) * block_size)
    q = torch.arange(first, docs.numel(), device=docs.device)[:, None]
    k = torch.arange(start, docs.numel(), device=docs.device)[None, :]
    block_distance = q // block_size - k // block_size
    return (k <= q) & (docs[first:, None] == docs[None, start:]) & (block_distance < window_blocks)


def _ordered(mask: Tensor):
    """Per query block: the number of True key blocks and their indices, True ones first."""
    counts = mask.sum(-1, dtype=torch.int32)
    indices = torch.argsort(mask.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts[None, None].contiguous(), indices.to(torch.int32)[None, None].contiguous()


def block_attention_masks(docs: Tensor, windows, block_size: int) -> list:
    """FlexAttention BlockMasks for each window, built from per-block document bounds.

    Only (T/block)^2 booleans are formed: a key block is skipped when it is outside the window,
    in the future, or holds only other documents; it is 'full' (no per-token mask needed) when
    it lies strictly before the query block and both hold a single, shared document.
    """
    num_blocks = docs.numel() // block_size
    first_doc = docs[::block_size]
    last_doc = docs[block_size - 1::block_size]
    b = torch.arange(num_blocks, device=docs.device)
    q, k = b[:, None], b[None, :]
    causal = k <= q
    overlaps = last_doc[None, :] >= first_doc[:, None]  # with k <= q: shares a document
    single_doc = first_doc[None, :] == last_doc[:, None]  # key block start .. query block end
    full = (k < q) & single_doc
    partial = causal & overlaps & ~full

    masks = []
    for window in windows:
        in_window = (q - k) < window
        kv_num, kv_idx = _ordered(partial & in_window)
        full_num, full_idx = _ordered(full & in_window)
        masks.append(BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                              BLOCK_SIZE=block_size,
                                              mask_mod=_mask_rule(docs, window, block_size)))
    return masks


def _mask_rule(docs: Tensor, window, block_size: int):
    """The rule as a FlexAttention mask_mod. The window is repeated here although the block
    lists already enforce it: FlexAttention without compile applies only the mask_mod."""

    def rule(batch, head, q_idx, kv_idx):
        in_window = q_idx // block_size - kv_idx // block_size < window
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx]) & in_window

    return rule


def attention_masks(docs: Tensor, windows, block_size: int, on_gpu: bool) -> dict:
    """{"S": short-window mask, "L": long-window mask} in the encoding of the device."""
    if on_gpu:
        short, long = block_attention_masks(docs, windows, block_size)
    else:
        short, long = (dense_attention_mask(docs, w, block_size) for w in windows)
    return {"S": short, "L": long}
