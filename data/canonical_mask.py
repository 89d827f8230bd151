"""Canonical-token masking at validation (modded-nanogpt #350): after token p, the GPT-2
tokenizer never emits some tokens x, because a merge would have joined p's end with x's start.
Setting those logits far below the rest before the softmax moves their probability to the
tokens that can occur; the loss of a canonically tokenized text can only drop (by about 0.0017
on FineWeb val for record #89, per #350). Training is unchanged; only the metric differs.

The table is built from the tokenizer's merges alone (a few seconds, 2.5 GB of host memory
while it is built): each token's own BPE run gives, for every merge rank, the piece its first
and its last bytes form at that point; a merge (a, b) of rank r masks x after p when p's last
piece is a and x's first piece is b at rank r, and the pre-tokenizer lets a merge cross the
seam between p's last character and x's first (not between whitespace runs, not into a
letter after a non-letter, which a contraction such as "'s" could split, not where x begins
inside a character). Tokens ending in a contraction mask nothing; nor do BOS and the padding
of the vocabulary, nor is either ever masked. The rule is #350's, bit for bit
(tests/test_canonical_mask.py).
"""

import unicodedata

import numpy as np

# pre-tokenizer classes of a token's first and last character
CLASSES = "SNLO?"  # whitespace, number, letter, other, inside a character
SEAM_MERGES = np.ones((len(CLASSES), len(CLASSES)), dtype=bool)  # [end of p, start of x]
SEAM_MERGES[:, CLASSES.index("?")] = False
SEAM_MERGES[CLASSES.index("S"), CLASSES.index("S")] = False
SEAM_MERGES[CLASSES.index("O"), CLASSES.index("L")] = False
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
NEVER = 1 << 30  # a rank past every merge
MASKED_LOGIT = -60.0  # far below the softcapped logits' (0, 23)


def char_class(ch: str) -> str:
    if ch.isspace() and not "\x1c" <= ch <= "\x1f":
        return "S"
    category = unicodedata.category(ch)[0]
    return category if category in "LN" else "O"


def edge_class(token: bytes, first: bool) -> int:
    """The class of the token's first (or last) character; "?" when no 1-4 bytes at that end
    decode."""
    for n in range(1, 5):
        try:
            text = (token[:n] if first else token[-n:]).decode()
        except UnicodeDecodeError:
            continue
        return CLASSES.index(char_class(text[0] if first else text[-1]))
    return CLASSES.index("?")


def ends_in_contraction(text: str) -> bool:
    for contraction in CONTRACTIONS:
        if text.endswith(contraction):
            before = text[:-len(contraction)]
            return not before or char_class(before[-1]) in "LN"
    return False


def edge_pieces(token: bytes, ranks: dict) -> tuple[list, list, tuple | None]:
    """BPE of the token's bytes on their own: the (rank from which, piece) steps of its first
    piece and of its last piece, and the last merge (a, b). A merge at the first piece counts
    from the next rank on: at equal rank the leftmost merge goes first, so a seam merge of
    that rank would have come before it."""
    pieces = [bytes([byte]) for byte in token]
    firsts, lasts, merge = [(0, pieces[0])], [(0, pieces[-1])], None
    while len(pieces) > 1:
        candidates = [(ranks[pieces[i] + pieces[i + 1]], i) for i in range(len(pieces) - 1)
                      if pieces[i] + pieces[i + 1] in ranks]
        if not candidates:
            break
        rank, i = min(candidates)
        merge = pieces[i], pieces[i + 1]
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
        if i == 0:
            firsts.append((rank + 1, pieces[0]))
        if i == len(pieces) - 1:
            lasts.append((rank, pieces[-1]))
    return firsts, lasts, merge


def spans_by_piece(steps: dict) -> dict:
    """piece -> [(from rank, to rank, token)] of the tokens whose edge is that piece then."""
    spans = {}
    for token_id, token_steps in steps.items():
        for k, (start, piece) in enumerate(token_steps):
            end = token_steps[k + 1][0] if k + 1 < len(token_steps) else NEVER
            if start < end:
                spans.setdefault(piece, []).append((start, end, token_id))
    return spans


def build_canonical_mask(vocab_size: int) -> np.ndarray:
    """uint8 (vocab_size, vocab_size / 8): bit x of row p (little-endian within a byte) is set
    when the tokenizer never emits token x right after token p."""
    import tiktoken

    if vocab_size % 8:
        raise ValueError(f"vocab_size must be a multiple of 8, got {vocab_size}")
    ranks = tiktoken.get_encoding("gpt2")._mergeable_ranks  # token bytes -> id = merge rank
    firsts, lasts, merges = {}, {}, {}
    end_class = np.full(vocab_size, CLASSES.index("?"))
    start_class = np.full(vocab_size, CLASSES.index("?"))
    closed = np.zeros(vocab_size, dtype=bool)
    for token, token_id in ranks.items():
        firsts[token_id], lasts[token_id], merge = edge_pieces(token, ranks)
        if merge is not None:
            merges[token_id] = merge
        start_class[token_id] = edge_class(token, first=True)
        end_class[token_id] = edge_class(token, first=False)
        try:
            closed[token_id] = ends_in_contraction(token.decode())
        except UnicodeDecodeError:
            pass  # it ends inside a character, not in a contraction
    by_last, by_first = spans_by_piece(lasts), spans_by_piece(firsts)
    mask = np.zeros((vocab_size, vocab_size), dtype=bool)
    for rank, (a, b) in merges.items():
        before = np.array([p for start, end, p in by_last.get(a, ()) if start <= rank < end],
                          dtype=np.intp)
        before = before[~closed[before]]
        after = np.array([x for start, end, x in by_first.get(b, ()) if start <= rank < end],
                         dtype=np.intp)
        if len(before) and len(after):
            mask[np.ix_(before, after)] |= SEAM_MERGES[np.ix_(end_class[before],
                                                              start_class[after])]
    return np.packbits(mask, axis=1, bitorder="little")


def mask_logits(logits, previous, table):
    """``logits`` (R, V) with MASKED_LOGIT where the tokenizer never emits the token after
    ``previous`` (R,), the token before each row's target; ``table`` from
    build_canonical_mask, as a tensor on the logits' device."""
    import torch

    shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
    dropped = (table[previous.long(), :, None] >> shifts & 1).view(previous.numel(), -1)
    return logits.masked_fill(dropped[:, :logits.size(1)].bool(), MASKED_LOGIT)
