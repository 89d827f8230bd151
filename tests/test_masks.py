"""layers/masks.py: the attention rule as a dense mask and as FlexAttention block masks."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from data.shards import BOS_ID
from layers.masks import block_attention_masks, dense_attention_mask, document_ids
from utils import REPO_ROOT


def tokens(n, doc_starts=(0,), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50000, (n,), generator=g)
    x[list(doc_starts)] = BOS_ID
    return x


def brute_force_mask(docs, window, block, token_window=False):
    T = len(docs)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(q + 1):
            near = q - k <= window if token_window else q // block - k // block < window
            mask[q, k] = docs[q] == docs[k] and near
    return mask


def test_segment_cap_cuts_long_documents_from_their_bos():
    x = tokens(24, doc_starts=(0, 9, 12))
    assert document_ids(x, 4).tolist() == [1] * 4 + [2] * 4 + [3] + [4] * 3 + [5] * 4 + [6] * 4 \
        + [7] * 4
    assert torch.equal(document_ids(x, 12), document_ids(x))
    # a row that does not open with a BOS counts from its first token, as validation's chunks
    assert document_ids(tokens(10, doc_starts=(6,)), 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]


def test_segment_cap_matches_record92s_attention_segments():
    """Record #92's loader (its VIRTUAL_SEQ_CAP of 2560, run in a scratch folder on synthetic
    documents; tests/reference/record92/segments.json) ends attention segments where these
    ids change."""
    data = json.loads((REPO_ROOT / "tests" / "reference" / "record92" / "segments.json")
                      .read_text())
    assert sum(case["longer_than_cap"] for case in data["cases"]) >= 10
    for case in data["cases"]:
        x = torch.randint(0, 50000, (case["tokens"],), generator=torch.Generator().manual_seed(0))
        x[torch.tensor([0, *torch.tensor(case["doc_lengths"]).cumsum(0)[:-1].tolist()])] = BOS_ID
        docs = document_ids(x, data["virtual_seq_cap"])
        ends = [*((docs[1:] != docs[:-1]).nonzero()[:, 0] + 1).tolist(), case["tokens"]]
        assert ends == case["segment_ends"]


@pytest.mark.parametrize("token_window", [False, True])
def test_dense_mask_is_the_rule(token_window):
    x = tokens(64, doc_starts=(0, 5, 30, 31, 47))
    docs = document_ids(x)
    for window in (1, 2, 3, 10, 17):
        assert torch.equal(dense_attention_mask(docs, window, 8, token_window),
                           brute_force_mask(docs.tolist(), window, 8, token_window))


@pytest.mark.parametrize("window,token_window", [(1, False), (2, False), (5, False),
                                                 (0, True), (15, True), (16, True), (37, True),
                                                 (80, True)])
def test_block_mask_matches_dense_mask(window, token_window):
    x = tokens(128, doc_starts=(0, 5, 30, 31, 47, 64, 100))
    docs = document_ids(x)
    (block_mask,) = block_attention_masks(docs, [window], 16, token_window)
    # per (query block, key block): listed exactly when one pair in it may attend, and listed
    # as full (no per-token mask) exactly when every pair may and the key block lies before
    pairs = brute_force_mask(docs.tolist(), window, 16, token_window).view(8, 16, 8, 16)
    any_pair, every_pair = pairs.any(3).any(1), pairs.all(3).all(1)
    assert torch.equal(block_mask.to_dense().bool()[0, 0], any_pair)
    full = torch.zeros(8, 8, dtype=torch.bool)
    for q in range(8):
        count = block_mask.full_kv_num_blocks[0, 0, q]
        full[q, block_mask.full_kv_indices[0, 0, q, :count]] = True
    assert torch.equal(full, every_pair & torch.ones(8, 8, dtype=torch.bool).tril(-1))
    # FlexAttention (whose forward runs on the CPU) and SDPA with the dense mask agree
    q, k, v = torch.randn(3, 1, 2, 128, 32).unbind(0)
    flex = flex_attention(q, k, v, block_mask=block_mask, scale=0.1)
    dense = F.scaled_dot_product_attention(
        q, k, v, attn_mask=dense_attention_mask(docs, window, 16, token_window), scale=0.1)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,token_window,rows_per_token", [(2, False, 1), (37, True, 1),
                                                                (20, True, 2)])
def test_block_mask_lists_are_flex_attentions_own(window, token_window, rows_per_token):
    """The sort-free lists (key blocks per query block, and the backward's query blocks per key
    block) hold what BlockMask.from_kv_blocks derives with its sorts: the same counts and, up
    to each count, the same indices in the same order."""
    x = tokens(256, doc_starts=(0, 5, 30, 31, 47, 64, 100, 200))
    (ours,) = block_attention_masks(document_ids(x), [window], 16, token_window,
                                    rows_per_token)
    theirs = BlockMask.from_kv_blocks(ours.kv_num_blocks, ours.kv_indices,
                                      ours.full_kv_num_blocks, ours.full_kv_indices,
                                      BLOCK_SIZE=16, mask_mod=ours.mask_mod)
    for side in ("kv", "full_kv", "q", "full_q"):
        counts, their_counts = (getattr(m, f"{side}_num_blocks") for m in (ours, theirs))
        assert torch.equal(counts, their_counts), side
        for row, count in enumerate(counts[0, 0].tolist()):
            a, b = (getattr(m, f"{side}_indices")[0, 0, row, :count] for m in (ours, theirs))
            assert torch.equal(a, b), (side, row)
    assert ours.seq_lengths == theirs.seq_lengths and ours.BLOCK_SIZE == theirs.BLOCK_SIZE


def test_block_mask_skips_blocks_outside_window_and_documents():
    x = tokens(128, doc_starts=(0, 64))  # two documents of four 16-token blocks each
    (block_mask,) = block_attention_masks(document_ids(x), [2], 16)
    kv_num = block_mask.kv_num_blocks[0, 0].tolist()
    full_num = block_mask.full_kv_num_blocks[0, 0].tolist()
    # the first block of each document has only its diagonal (partial) block
    assert [kv_num[i] + full_num[i] for i in range(8)] == [1, 2, 2, 2, 1, 2, 2, 2]
    assert full_num == [0, 1, 1, 1, 0, 1, 1, 1]


@pytest.mark.parametrize("rows_per_token", [1, 2])
def test_doubled_rows_follow_their_tokens_documents(rows_per_token):
    """Paired heads attend over a doubled sequence, rows 2t and 2t + 1 belonging to token t:
    the masks over the rows are those of the repeated document ids, read through the tokens."""
    x = tokens(64, doc_starts=(0, 5, 30, 31, 47))
    docs = document_ids(x)
    rows = docs.repeat_interleave(rows_per_token)
    want = brute_force_mask(rows.tolist(), 20, 16, token_window=True)
    assert torch.equal(dense_attention_mask(docs, 20, 16, True, rows_per_token), want)
    (block_mask,) = block_attention_masks(docs, [20], 16, True, rows_per_token)
    listed = block_mask.to_dense().bool()[0, 0].repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert torch.equal(listed & want, want)
    q, k, v = torch.randn(3, 1, 2, 64 * rows_per_token, 32).unbind(0)
    flex = flex_attention(q, k, v, block_mask=block_mask, scale=0.1)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=want, scale=0.1)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
