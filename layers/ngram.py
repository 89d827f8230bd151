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

Autograd gives the table a dense gradient, a table-sized tensor every micro-batch. In training
(``training_config.ngram_row_grads``) the gradient is kept as rows instead (``RowGradients``):
each micro-batch's looked-up rows' gradients and their row ids, summed per row at the table's
Adam step, so that the table's memory is its weights alone.
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
        # see row_gradients: its slots' buffer and the next micro-batch's first slot
        self.register_buffer("row_grad_buffer", None, persistent=False)
        self.register_buffer("row_grad_offset", None, persistent=False)

    def forward(self, inputs: Tensor, dtype: torch.dtype) -> Tensor:
        ids = ngram_rows(inputs, self.rows).flatten()
        if self.row_grad_buffer is None:
            looked_up = rows(self.table, ids, self.table_grad)
        else:
            slots = self.row_grad_offset + torch.arange(ids.numel(), device=ids.device)
            looked_up = rows(self.table, ids, self.row_grad_buffer, slots)
        signs = self.signs[sign_rows(inputs, self.signs.size(0))]
        return (looked_up.view(2, -1, looked_up.size(-1)) * signs).sum(0)[None].to(dtype)

    def grads_in_place(self) -> list:
        """Give the table a gradient buffer (``layers.embeddings.rows``); returns the (table,
        buffer) pair in a list."""
        self.table_grad = torch.zeros_like(self.table)
        return [(self.table, self.table_grad)]

    def row_gradients(self, capacity: int) -> "RowGradients":
        """From now on the table's gradient is kept as rows, up to ``capacity`` looked-up rows
        between two of its Adam steps (``RowGradients``); the optimizer finds them on the
        table (``table.row_grads``)."""
        grads = self.table.row_grads = RowGradients(self.table, capacity, self.rows)
        self.row_grad_buffer, self.row_grad_offset = grads.grads, grads.offset
        return grads


class RowGradients:
    """The n-gram table's gradient as (row id, gradient row) pairs since its last Adam step.

    Before a micro-batch's forward pass ``append`` stores its looked-up row ids (2 a token) in
    the next free slots and points the lookup's backward at them (``offset``, a device scalar:
    no recompile); the backward adds each row's gradient into its slot. The optimizer sums them
    per row at the table's step (``updates.adam_rows_``) and ``clear`` starts over."""

    def __init__(self, table: Tensor, capacity: int, num_rows: int):
        self.num_rows = num_rows
        self.grads = table.new_zeros(capacity, table.size(1))
        self.ids = torch.zeros(capacity, dtype=torch.long, device=table.device)
        self.offset = torch.zeros((), dtype=torch.long, device=table.device)
        self.used = 0

    def append(self, inputs: Tensor) -> None:
        ids = ngram_rows(inputs, self.num_rows).flatten()
        end = self.used + ids.numel()
        if end > self.ids.numel():
            raise RuntimeError(f"the n-gram table's row gradients hold {self.ids.numel():,} "
                               f"rows between its steps; {end:,} were looked up")
        self.ids[self.used:end] = ids
        self.offset.fill_(self.used)
        self.used = end

    def load(self, ids: Tensor, grads: Tensor) -> None:
        """Hold these (row id, gradient) pairs as the only ones (a checkpoint's)."""
        self.clear()
        self.used = ids.numel()
        self.ids[:self.used] = ids
        self.grads[:self.used] = grads

    def clear(self) -> None:
        # no zeroing: the lookup's backward writes each slot whole (``copy_rows_``), gigabytes
        self.used = 0
