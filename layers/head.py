"""The head of a speedrun GPT: what the lm_head is asked to predict (the next token, and in
record #89's schedule also the tokens after it, multi-token prediction, and the next token's
prefix token, #337, each with its weight from the stage table), and ``SpeedrunLM``, what both
GPTs (record #89's and #55's) share from their final hidden states on: the loss op, the
logits, the dtype plan, the embedding tie's state and the delayed float8 scales' step."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from layers.masks import document_ids
from layers.mlp import MLP
from layers.sampled import sampled_loss


def prediction_targets(targets: Tensor, weights: Tensor, prefix_table: Tensor | None):
    """(T, J) targets and weights for ``kernels.linear_softcap_cross_entropy``.

    ``targets`` (T,) are the next tokens, -1 where a row is not scored (validation's context);
    ``weights`` (K + 1,) the loss weights of the K tokens ahead and of the prefix token. Column
    k targets the token k + 1 ahead, ``targets[i + k]``, absent (-1, weight 0) past the
    sequence's end (as the record, across documents); a last column targets
    ``prefix_table[targets]``, absent where a token has no prefix, unless ``prefix_table`` is
    None (the model has none, or the loss leaves the prefix token out)."""
    K = weights.numel() - 1
    columns, column_weights = [], []
    for k in range(K):
        ahead = torch.cat([targets[k:], targets.new_full((k,), -1)])
        columns.append(ahead)
        column_weights.append(torch.where(ahead >= 0, weights[k], 0.0))
    if prefix_table is not None:
        prefix = torch.where(targets >= 0, prefix_table[targets.clamp_min(0)], -1)
        columns.append(prefix)
        column_weights.append(torch.where(prefix >= 0, weights[K], 0.0))
    return torch.stack(columns, 1), torch.stack(column_weights, 1)


class SpeedrunLM(nn.Module):
    """A GPT of this project from its final hidden states on. A subclass sets ``config``,
    ``lm_head``, ``tie`` (layers.embeddings.EmbeddingTie) and ``prefix_table`` (None without
    prefix-token prediction), and defines ``hidden_states(inputs, docs)`` -> (1, T, D)."""

    def get_extra_state(self):
        return {"tied": self.tie.tied}

    def set_extra_state(self, state):
        self.tie.tied = state["tied"]

    def refresh_float8_scales(self):
        """The MLPs' delayed float8 scales for the next step (``MLP.refresh_scales``): the
        trainer's, once a step after its last backward pass."""
        for module in self.modules():
            if isinstance(module, MLP) and module.delayed:
                module.refresh_scales()

    def forward(self, inputs: Tensor, targets: Tensor | None = None, docs: Tensor | None = None,
                loss_weights: Tensor | None = None, candidates: Tensor | None = None,
                prefix: bool = True):
        """inputs: (T,) token ids, T a multiple of the block size. Returns the loss averaged
        over the T rows (each row's targets weighted by ``loss_weights``, see
        ``prediction_targets``; the next token alone when None), or the (T, vocab_size) logits
        when no targets are given. ``prefix`` False leaves the prefix token's target out (its
        weight unused): each target costs the loss op's backward a gather and a scatter-add.

        ``docs`` (``document_ids(inputs)``) may be passed in: the trainer computes it outside
        the compiled graph, where inductor cannot lower FlexAttention's mask_mod reading a
        tensor computed inside the same graph (seen with torch 2.11 at T = 64K).

        ``candidates`` (G, P): sampled softmax (``layers/sampled.py``) over each of G groups of
        T / G consecutive rows, whose tokens ahead then end at the group's end."""
        if docs is None:
            docs = document_ids(inputs)
        # (T, D) rows: indexing (1, T, V) logits would cost a full copy of their gradient in
        # the backward pass
        hidden = self.hidden_states(inputs, docs)[0]
        if targets is None:
            return self.logits(hidden)[:, :self.config.vocab_size]
        return self.loss(hidden, targets, loss_weights, candidates, prefix)

    def compiled_forward(self):
        """``forward`` with targets, compiled as two graphs: the hidden states (the trunk), and
        the loss over them, a graph for the full softmax and one for the sampled softmax at
        any set size. The trunk, the same for both losses, then compiles once: as one graph
        with its loss it compiled once per loss (README, Speed). The boundary costs nothing
        the loss op did not already pay: its input, the hidden states, is written out either
        way."""
        trunk = torch.compile(self.hidden_states, dynamic=False, fullgraph=True)
        head = torch.compile(self.loss, dynamic=False, fullgraph=True)

        def forward(inputs, targets, docs, loss_weights=None, candidates=None, prefix=True):
            return head(trunk(inputs, docs)[0], targets, loss_weights, candidates, prefix)

        return forward

    def loss(self, hidden: Tensor, targets: Tensor, loss_weights: Tensor | None = None,
             candidates: Tensor | None = None, prefix: bool = True) -> Tensor:
        """The training loss of final hidden states (T, D), as ``forward`` describes it."""
        weights, prefix_table = None, self.prefix_table if prefix else None
        if candidates is not None:
            if loss_weights is None:
                loss_weights = hidden.new_tensor([1.0, 0.0], dtype=torch.float32)
            groups = targets.view(candidates.size(0), -1)
            targets, weights = (torch.cat(parts) for parts in zip(*(
                prediction_targets(group, loss_weights, prefix_table) for group in groups),
                strict=True))
            return sampled_loss(hidden, self.lm_head.type_as(hidden), targets, weights,
                                candidates, self.softcap_args, self.config.fp8_lm_head)
        if loss_weights is not None:
            targets, weights = prediction_targets(targets, loss_weights, prefix_table)
        return kernels.linear_softcap_cross_entropy(
            hidden, self.lm_head.type_as(hidden), targets, *self.softcap_args,
            fp8=self.config.fp8_lm_head, weights=weights)

    def logits(self, hidden: Tensor) -> Tensor:
        """The softcapped float32 logits (T, padded vocab) of final hidden states (T, D). The
        columns past vocab_size belong to no token, but the training loss normalises over
        them too; a distribution over tokens leaves them out."""
        logits = F.linear(hidden, self.lm_head.type_as(hidden))
        return kernels.softcap(logits.float(), *self.softcap_args)

    @property
    def softcap_args(self):
        """(cap, shift, temp, tanh) as kernels.py takes them."""
        c = self.config
        return c.logit_softcap, c.softcap_shift, c.softcap_temp, c.softcap_form == "tanh"

    @staticmethod
    def compute_dtype(inputs):
        """The dtype of the residual stream, the activations and the matmul inputs: bf16 on
        CUDA; float32 elsewhere, the reference the CUDA path is tested against. Weights stay
        float32 and are cast where used; reductions (norms, softmax, loss) run in float32."""
        return torch.bfloat16 if inputs.is_cuda else torch.float32
