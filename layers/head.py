"""What the lm_head is asked to predict: the next token, and in record #89's schedule also the
tokens after it (multi-token prediction, #337's predecessors) and the next token's prefix
token (prefix-token prediction, #337), each with its weight from the stage table."""

import torch
from torch import Tensor


def prediction_targets(targets: Tensor, weights: Tensor, prefix_table: Tensor | None):
    """(T, J) targets and weights for ``kernels.linear_softcap_cross_entropy``.

    ``targets`` (T,) are the next tokens, -1 where a row is not scored (validation's context);
    ``weights`` (K + 1,) the loss weights of the K tokens ahead and of the prefix token. Column
    k targets the token k + 1 ahead, ``targets[i + k]``, absent (-1, weight 0) past the
    sequence's end (as the record, across documents); a last column targets
    ``prefix_table[targets]``, absent where a token has no prefix, unless the model has no
    prefix table."""
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
