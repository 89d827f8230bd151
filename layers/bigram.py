"""The bigram hash embedding (modded-nanogpt #201, with the sign trick of #299).

Each position looks up a row of a large table by a hash of its token and the one before it,
so the model gets (previous, current) pair information without attending for it. The table
starts at zero and learns through its own gate. Rows are shared by colliding pairs; the sign
trick multiplies each looked-up row by a fixed random +-1 vector chosen by a second, cheap
index of the pair (x[t-1] xor x[t]), so that colliding pairs that disagree can still be told
apart. The hash is the record's, bit for bit, including its quirk at the start of a
sequence: position 0 takes the reserved last row, and position 1 hashes its token with that
row's number instead of token 0 (the record overwrites the first entry before it reads it).
"""

import torch
from torch import Tensor, nn

from layers.core import make_param
from layers.embeddings import rows

HASH_CURRENT, HASH_PREVIOUS = 36313, 27191


def wrap32(values: Tensor) -> Tensor:
    """int64 values as the int32 two's complement a CUDA int32 product wraps to."""
    return (values + 2**31) % 2**32 - 2**31


def bigram_hash(inputs: Tensor, rows: int) -> Tensor:
    """Row of each position in a table of ``rows`` rows (int64, (T,)); int32 arithmetic as the
    record's: products wrap (at position 1, whose "previous token" is the reserved row's number,
    for any table of over 78,980 rows), remainders are taken the Python way."""
    reserved = rows - 1
    x = inputs.long()
    previous = torch.cat([x.new_full((2,), reserved), x[1:-1]])[: x.numel()]
    mixed = wrap32(HASH_CURRENT * x) ^ wrap32(HASH_PREVIOUS * previous)
    hashed = torch.remainder(mixed, reserved)
    return torch.cat([x.new_full((1,), reserved), hashed[1:]])[: x.numel()]


def sign_index(inputs: Tensor, rows: int) -> Tensor:
    """(x[t-1] xor x[t]) mod rows for t >= 1, 0 at position 0: the sign vector's row."""
    x = inputs.long()
    return torch.cat([x.new_zeros(1), torch.remainder(x[:-1] ^ x[1:], rows)])[: x.numel()]


class BigramEmbedding(nn.Module):
    def __init__(self, num_rows: int, dim: int, sign_rows: int):
        super().__init__()
        self.rows = num_rows
        self.table = make_param(torch.zeros(num_rows, dim), "bigram_embed")
        # A fixed random +-1 vector per sign row, drawn from the run's seeded generator.
        self.register_buffer("signs", torch.randn(sign_rows, dim).sign())
        self.register_buffer("table_grad", None, persistent=False)  # see grads_in_place

    def forward(self, inputs: Tensor, dtype: torch.dtype) -> Tensor:
        looked_up = rows(self.table, bigram_hash(inputs, self.rows), self.table_grad)
        signs = self.signs[sign_index(inputs, self.signs.size(0))]
        return (looked_up * signs)[None].to(dtype)

    def grads_in_place(self) -> list:
        """Give the table a gradient buffer (``layers.embeddings.rows``); returns the (table,
        buffer) pair in a list."""
        self.table_grad = torch.zeros_like(self.table)
        return [(self.table, self.table_grad)]
