"""What the model adds to the token stream besides the token embedding itself: value
embeddings, the smear gate, and the tie of the token embedding to the lm_head."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.shards import BOS_ID
from layers.core import GATE_CHANNELS, gate_input, make_param


class ValueEmbeddings(nn.Module):
    """Token-indexed tables added to the attention values of chosen layers (a table may feed
    several layers): token identity straight into attention, zero at the start."""

    def __init__(self, vocab: int, dim: int, layers_per_table: tuple, init_std: float = 0.0):
        super().__init__()
        self.tables = nn.ParameterList(
            [make_param(torch.randn(vocab, dim) * init_std if init_std else
                        torch.zeros(vocab, dim), "value_embed") for _ in layers_per_table])
        self.table_of = {layer: t for t, layers in enumerate(layers_per_table) for layer in layers}

    def forward(self, inputs: Tensor, dtype: torch.dtype) -> dict:
        """{layer: (1, T, dim) embedding} for every layer that takes one."""
        looked_up = [F.embedding(inputs, table)[None].to(dtype) for table in self.tables]
        return {layer: looked_up[t] for layer, t in self.table_of.items()}


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
