"""Attention masks. One rule, two encodings:

    query q may attend key k  <=>  k <= q  and  doc(k) == doc(q)  and  k is in q's window

doc(t) counts the BOS tokens up to t, so a document starts at its BOS (and, with a segment cap,
a new segment every that many tokens of a long document). The window is counted
in blocks (block(q) - block(k) < window, record #55) or in tokens (q - k <= window, as
FlashAttention's sliding window of record #89: window + 1 keys). On CUDA the rule is a
FlexAttention ``BlockMask`` (block-sparse: whole key blocks are skipped); on the CPU, where
FlexAttention has no backward pass, the same rule is a dense (T, T) boolean mask for
``scaled_dot_product_attention``.
"""

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from data.shards import BOS_ID
from layers.core import true_columns


def document_ids(inputs: Tensor, segment_cap: int = 0) -> Tensor:
    """doc(t) for a flat row of tokens. With ``segment_cap``, a document longer than that is
    cut, for attention only, into segments of ``segment_cap`` tokens counted from its BOS
    (record #92's attention segments of 2560 tokens in documents of up to 3072)."""
    starts = inputs == BOS_ID
    if segment_cap:
        t = torch.arange(inputs.numel(), device=inputs.device)
        since = t - torch.cummax(torch.where(starts, t, 0), 0).values  # tokens since the BOS
        starts = starts | ((since % segment_cap == 0) & (since > 0))
    return starts.cumsum(0).to(torch.int32)


def dense_attention_mask(docs: Tensor, window, block_size: int, token_window=False,
                         rows_per_token=1) -> Tensor:
    """The (R, R) boolean mask of the rule above over R = T * rows_per_token rows (2 for the
    doubled sequence of paired heads: row r belongs to token r // 2), for
    scaled_dot_product_attention."""
    return attention_rows(docs, docs.numel() * rows_per_token, window, block_size,
                          token_window, rows_per_token)


def attention_rows(docs: Tensor, queries: int, window, block_size: int, token_window=False,
                   rows_per_token=1) -> Tensor:
    """The rule for the last ``queries`` rows against the keys their windows reach: a
    (queries, width) boolean mask over the last ``width`` rows. All rows give the (R, R) mask;
    the few of a decoding step give rows no wider than the window plus the step's own,
    however long the sequence grows."""
    rows = docs.numel() * rows_per_token
    first = rows - queries
    if first == 0:
        start = 0
    elif token_window:
        start = max(0, first - window)
    else:
        start = max(0, (first // block_size - window + 1) * block_size)
    q = torch.arange(first, rows, device=docs.device)[:, None]
    k = torch.arange(start, rows, device=docs.device)[None, :]
    if token_window:
        in_window = q - k <= window
    else:
        in_window = q // block_size - k // block_size < window
    same_doc = docs[q // rows_per_token] == docs[k // rows_per_token]
    return (k <= q) & same_doc & in_window


def _ordered(mask: Tensor):
    """Per row of a block mask: the number of True blocks and their indices in ascending order
    (what FlexAttention's own lists hold; entries past the count are never read), without the
    sort FlexAttention uses: inductor fused the sorts of every mask into one kernel whose
    Triton compile took minutes at 128 blocks (a 16K-token micro-batch)."""
    counts = mask.sum(-1, dtype=torch.int32)
    indices = true_columns(mask, mask.size(-1)).to(torch.int32)
    return counts[None, None].contiguous(), indices[None, None].contiguous()


def block_attention_masks(docs: Tensor, windows, block_size: int, token_window=False,
                          rows_per_token=1) -> list:
    """FlexAttention BlockMasks for each window, built from per-block document bounds, over
    T * rows_per_token rows (see ``dense_attention_mask``).

    Only (T/block)^2 booleans are formed: a key block is skipped when it is outside the window,
    in the future, or holds only other documents; it is 'full' (no per-token mask needed) when
    it lies strictly before the query block, all its tokens inside the window, and both hold a
    single, shared document.
    """
    num_blocks = docs.numel() * rows_per_token // block_size
    b = torch.arange(num_blocks, device=docs.device)
    first_doc = docs[b * block_size // rows_per_token]
    last_doc = docs[(b * block_size + block_size - 1) // rows_per_token]
    q, k = b[:, None], b[None, :]
    causal = k <= q
    overlaps = last_doc[None, :] >= first_doc[:, None]  # with k <= q: shares a document
    single_doc = first_doc[None, :] == last_doc[:, None]  # key block start .. query block end
    full = (k < q) & single_doc
    partial = causal & overlaps & ~full

    masks = []
    for window in windows:
        if token_window:  # the two blocks' nearest and farthest token pairs
            some_in = (q - k - 1) * block_size + 1 <= window
            all_in = (q - k + 1) * block_size - 1 <= window
        else:
            some_in = all_in = (q - k) < window
        listed, whole = partial & some_in | full & some_in & ~all_in, full & all_in
        # the query-side lists (the backward pass's) from the transposed masks, as
        # BlockMask.from_kv_blocks would derive them, but without its sort
        (kv_num, kv_idx), (full_num, full_idx), (q_num, q_idx), (full_q_num, full_q_idx) = (
            _ordered(m) for m in (listed, whole, listed.t(), whole.t()))
        rows = num_blocks * block_size
        masks.append(BlockMask(
            seq_lengths=(rows, rows), kv_num_blocks=kv_num, kv_indices=kv_idx,
            full_kv_num_blocks=full_num, full_kv_indices=full_idx, q_num_blocks=q_num,
            q_indices=q_idx, full_q_num_blocks=full_q_num, full_q_indices=full_q_idx,
            BLOCK_SIZE=(block_size, block_size),
            mask_mod=_mask_rule(docs, window, block_size, token_window, rows_per_token)))
    return masks


def _mask_rule(docs: Tensor, window, block_size: int, token_window: bool, rows_per_token: int):
    """The rule as a FlexAttention mask_mod. The window is repeated here although the block
    lists already enforce it: FlexAttention without compile applies only the mask_mod. It
    reads ``docs`` itself (a row's token by division), not a tensor derived from it inside a
    compiled graph, which inductor cannot lower in a mask_mod."""

    def rule(batch, head, q_idx, kv_idx):
        if token_window:
            in_window = q_idx - kv_idx <= window
        else:
            in_window = q_idx // block_size - kv_idx // block_size < window
        same_doc = docs[q_idx // rows_per_token] == docs[kv_idx // rows_per_token]
        return (q_idx >= kv_idx) & same_doc & in_window

    return rule


def attention_masks(docs: Tensor, windows, block_size: int, on_gpu: bool,
                    token_window=False, rows_per_token=1) -> list:
    """A mask for each window, in the encoding of the device."""
    if on_gpu:
        return block_attention_masks(docs, windows, block_size, token_window, rows_per_token)
    return [dense_attention_mask(docs, w, block_size, token_window, rows_per_token)
            for w in windows]
