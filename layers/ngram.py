"""Record #92's hashed n-gram table: record #89's bigram table grown into two channels.

Half of the rows are looked up by a hash of (previous, current) token, the other half by a
hash of the last three tokens; each looked-up row is multiplied by its own row of a shared
table of fixed random +-1 vectors (picked by two further cheap hashes, one a channel), and the
two products are summed. The hashes are the record's ``get_sgsame_hash`` bit for bit: int32
products that wrap (the trigram's overflow from token ids near 35,000 on), remainders taken
the Python way; position 0 takes the bigram half's reserved last row and position 1 hashes its
token with that row's number (the record's quirk, as in record #89), positions 0 and 1 take
the trigram half's reserved last row. The table is trained by a row-wise Adam without momentum
(``row_adam``: one second moment a row, optimizers.py), as the record trains it.
"""

import torch
from torch import Tensor, nn

from layers.bigram import bigram_hash, wrap32
from layers.core import make_param
from layers.embeddings import rows

TRIGRAM = (17351, 60961, 45259)  # x[t], x[t-1], x[t-2]
SIGN_BIGRAM = (48271, 30011)  # x[t], x[t-1]
SIGN_TRIGRAM = (58699, 39779, 26801)  # x[t], x[t-1], x[t-2]


def ngram_rows(inputs: Tensor, num_rows: int) -> Tensor:
    """(2, T) int64 rows of each position: its bigram row (record #89's hash over the first
    half, [0, half)) and its trigram row (in [half, num_rows)), half = num_rows // 2."""
    x = inputs.long()
    half = num_rows // 2
    a, b, c = TRIGRAM
    trigram = torch.remainder(wrap32(a * x[2:]) ^ wrap32(b * x[1:-1]) ^ wrap32(c * x[:-2]),
                              num_rows - half - 1) + half
    return torch.stack([bigram_hash(x, half),
                        torch.cat([x.new_full((2,), num_rows - 1), trigram])[: x.numel()]])


def sign_rows(inputs: Tensor, num_signs: int) -> Tensor:
    """(2, T) rows of the +-1 table for each channel (num_signs a power of two); 0 where the
    channel has no history yet."""
    x = inputs.long()
    t = torch.arange(x.numel(), device=x.device)
    back1 = torch.cat([x.new_zeros(1), x[:-1]])
    back2 = torch.cat([x.new_zeros(2), x[:-2]])[: x.numel()]
    bigram = ((SIGN_BIGRAM[1] * back1) ^ (SIGN_BIGRAM[0] * x)) & (num_signs - 1)
    c, b, a = SIGN_TRIGRAM[2], SIGN_TRIGRAM[1], SIGN_TRIGRAM[0]
    trigram = ((c * back2) ^ (b * back1) ^ (a * x)) & (num_signs - 1)
    return torch.stack([torch.where(t >= 1, bigram, 0), torch.where(t >= 2, trigram, 0)])


class NgramEmbedding(nn.Module):
    def __init__(self, num_rows: int, dim: int, sign_rows: int, dtype=torch.float32):
        """``dtype``: the table's weights (bf16 as the record's; their gradient too)."""
        super().__init__()
        self.rows = num_rows  # even, sign_rows a power of two (model_config checks both)
        self.table = make_param(torch.zeros(num_rows, dim, dtype=dtype), "bigram_embed")
        self.table.row_adam = True
        # A fixed random +-1 vector per sign row, drawn from the run's seeded generator.
        self.register_buffer("signs", torch.randn(sign_rows, dim).sign())
        self.register_buffer("table_grad", None, persistent=False)  # see grads_in_place

    def forward(self, inputs: Tensor, dtype: torch.dtype) -> Tensor:
        looked_up = rows(self.table, ngram_rows(inputs, self.rows).flatten(), self.table_grad)
        signs = self.signs[sign_rows(inputs, self.signs.size(0))]
        return (looked_up.view(2, -1, looked_up.size(-1)) * signs).sum(0)[None].to(dtype)

    def grads_in_place(self) -> list:
        """Give the table a gradient buffer (``layers.embeddings.rows``); returns the (table,
        buffer) pair in a list."""
        self.table_grad = torch.zeros_like(self.table)
        return [(self.table, self.table_grad)]
