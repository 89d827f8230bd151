"""What the model adds to the token stream besides the token embedding itself: value
embeddings, the smear gate, and the tie of the token embedding to the lm_head; and lookups
whose gradients go straight into a table-sized buffer (``table_grads_in_place``)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.shards import BOS_ID
from layers.core import GATE_CHANNELS, gate_input, make_param

# -- lookups with their gradient added in place -----------------------------------------------
# Autograd gives an embedding table a dense, table-sized gradient every micro-batch (zeros plus
# the looked-up rows) and then adds it to .grad: for record #89's tables (522M float32
# parameters) about 8 GB of memory traffic a micro-batch for some 65K rows. With a buffer, the
# backward pass adds the rows into it instead, and ``collect_table_grads`` hands the sum to the
# tables' .grad once a step, before the optimizer.


@torch.library.custom_op("speedrun::add_rows_", mutates_args=("buffer",))
def add_rows_(buffer: Tensor, ids: Tensor, grad: Tensor) -> None:
    buffer.index_add_(0, ids, grad.to(buffer.dtype))


@torch.library.custom_op("speedrun::copy_rows_", mutates_args=("buffer",))
def copy_rows_(buffer: Tensor, slots: Tensor, grad: Tensor) -> None:
    # distinct slots: a plain indexed write, where index_add_ would add atomically
    buffer.index_copy_(0, slots, grad.to(buffer.dtype))


class _RowsIntoBuffer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, ids, buffer, slots):
        ctx.save_for_backward(ids if slots is None else slots, buffer)
        ctx.copy = slots is not None
        return F.embedding(ids, table)

    @staticmethod
    def backward(ctx, grad):
        slots, buffer = ctx.saved_tensors
        (copy_rows_ if ctx.copy else add_rows_)(buffer, slots.reshape(-1),
                                                 grad.reshape(-1, grad.size(-1)))
        return None, None, None, None


def rows(table: Tensor, ids: Tensor, buffer: Tensor | None = None,
         slots: Tensor | None = None) -> Tensor:
    """``table[ids]``; with a ``buffer`` the rows' gradient goes into it, and the table gets
    none from autograd: added at the looked-up rows of a buffer of the table's shape, or
    written at ``slots`` (distinct, one a row looked up, each written once) of any buffer (the
    n-gram table's row gradients)."""
    if buffer is None:
        return F.embedding(ids, table)
    return _RowsIntoBuffer.apply(table, ids, buffer, slots)


@torch.no_grad()
def collect_table_grads(pairs) -> None:
    """Add each buffer's gradient to its table's .grad (the optimizer reads it there; a
    gradient kept for a later step, as Adam's between its steps, goes on summing) and zero the
    buffer for the next step. ``pairs``: (table, buffer) for every table with a buffer."""
    for table, buffer in pairs:
        if table.grad is None:
            table.grad = buffer.clone()
        else:
            table.grad.add_(buffer)
        buffer.zero_()


class ValueEmbeddings(nn.Module):
    """Token-indexed tables added to the attention values of chosen layers (a table may feed
    several layers): token identity straight into attention, zero at the start."""

    def __init__(self, vocab: int, dim: int, layers_per_table: tuple, init_std: float = 0.0):
        super().__init__()
        self.tables = nn.ParameterList(
            [make_param(torch.randn(vocab, dim) * init_std if init_std else
                        torch.zeros(vocab, dim), "value_embed") for _ in layers_per_table])
        self.table_of = {layer: t for t, layers in enumerate(layers_per_table) for layer in layers}
        for t in range(len(self.tables)):
            self.register_buffer(f"grad_{t}", None, persistent=False)

    def forward(self, inputs: Tensor, dtype: torch.dtype) -> dict:
        """{layer: (1, T, dim) embedding} for every layer that takes one."""
        looked_up = [rows(table, inputs, getattr(self, f"grad_{t}"))[None].to(dtype)
                     for t, table in enumerate(self.tables)]
        return {layer: looked_up[t] for layer, t in self.table_of.items()}

    def grads_in_place(self) -> list:
        """Give every table a gradient buffer (``rows``); returns the (table, buffer) pairs."""
        for t, table in enumerate(self.tables):
            setattr(self, f"grad_{t}", torch.zeros_like(table))
        return [(table, getattr(self, f"grad_{t}")) for t, table in enumerate(self.tables)]


class SmearGate(nn.Module):
    """x_t += lambda * sigmoid(w . x_t[:12]) * x_{t-1}: each token takes in some of the one
    before it (cheap bigram information), not across a document start unless
    ``across_documents`` (record #89's, whose gate also learns 100 times slower and without
    weight decay: ``gate_lr_mul``, ``gate_wd_mul``)."""

    def __init__(self, across_documents: bool = False, gate_lr_mul: float = 1.0,
                 gate_wd_mul: float = 1.0):
        super().__init__()
        self.across_documents = across_documents
        self.gate = make_param(torch.zeros(GATE_CHANNELS), "gate", lr_mul=gate_lr_mul,
                               wd_mul=gate_wd_mul)
        self.strength = make_param(torch.zeros(1), "scalar", wd_mul=0.0)

    def forward(self, x: Tensor, inputs: Tensor, previous: Tensor | None = None) -> Tensor:
        """``previous``: the embedding of the token before ``inputs`` when decoding goes on
        from earlier tokens; None at the start of a sequence, whose first token takes nothing."""
        if previous is None:
            return torch.cat([x[:, :1], self._smear(x[:, 1:], inputs[1:], x[:, :-1])], dim=1)
        return self._smear(x, inputs, torch.cat([previous, x[:, :-1]], dim=1))

    def _smear(self, x: Tensor, inputs: Tensor, before: Tensor) -> Tensor:
        gate = torch.sigmoid(gate_input(x) @ self.gate.type_as(x))
        if not self.across_documents:
            gate = gate * (inputs != BOS_ID)
        return x + self.strength.type_as(x) * gate[..., None] * before


class EmbeddingTie:
    """The token embedding tied to the lm_head until the schedule's untie step.

    The embedding is its own tensor from the start, a copy of the lm_head: while tied, its
    gradient is added into the lm_head's before each optimizer step (``fold_grad``) and the
    lm_head's new values are copied back after it (``sync``), the same arithmetic as one
    shared tensor. The forward pass reads the same two tensors before and after the untie, so
    torch.compile builds one graph for the whole run. ``untie`` gives the embedding its own
    optimizer state (a copy of the lm_head's) and lets it train on its own gradient.
    """

    def __init__(self, embed: nn.Parameter, lm_head: nn.Parameter):
        self.embed, self.lm_head = embed, lm_head
        self.tied = True

    @torch.no_grad()
    def fold_grad(self) -> None:
        """While tied: the shared weight's gradient is the sum over its two uses. Collect it
        on the lm_head, which the optimizer steps, and drop the embedding's."""
        if not self.tied or self.embed.grad is None:
            return
        if self.lm_head.grad is None:
            self.lm_head.grad = self.embed.grad
        else:
            self.lm_head.grad.add_(self.embed.grad)
        self.embed.grad = None

    @torch.no_grad()
    def sync(self) -> None:
        """While tied: the embedding takes the lm_head's new values after an optimizer step."""
        if self.tied:
            self.embed.copy_(self.lm_head)

    def untie(self, optimizer) -> None:
        """From now on the embedding trains on its own gradient, starting from the lm_head's
        optimizer state."""
        if not self.tied:
            raise RuntimeError("embedding and lm_head are already untied")
        self.tied = False
        optimizer.copy_state(self.embed, self.lm_head)
