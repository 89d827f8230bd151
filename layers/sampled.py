"""Sampled softmax (record #92's "shared-negative sampled softcapped cross-entropy").

For most of training the record's loss normalises each row not over the whole vocabulary but
over a candidate set of P ids shared by a group of rows (in the record, one rank's batch): every
distinct target of the group, and then "negatives", the next ids of a fixed sweep over the
vocabulary (the permutation k -> 20011 k mod V) that are not targets yet. The set is sorted; no
randomness and no correction for the ids left out (the normaliser is the sum over the set).
Multi-token targets of a group are its own tokens, hence always in its set; a prefix target that
is not in the set drops that row's prefix term. The lm_head's gradient is the set's rows only.

``CandidateSampler`` builds the sets on the device without a host sync (record #92 builds them
on the host from the targets; the same sets); ``sampled_loss`` is the loss over them, with the
fused loss op of ``kernels.py`` on the gathered lm_head rows.
"""

import math

import torch
from torch import Tensor

import kernels
from layers.core import true_columns

STRIDE = 20011  # the sweep's step through the vocabulary (coprime with it)
DRAW_FACTOR, DRAW_EXTRA = 1.7, 256  # a set needing n negatives reads 1.7 n + 256 sweep ids


class CandidateSampler:
    """The candidate sets of ``groups`` groups of rows, each with its own place in the sweep
    (group g starts at vocab * g // groups, record #92's rank offsets for its 8 ranks), which
    moves on by the ids it read at each set it builds. ``state_dict`` holds the places, for an
    exact resume."""

    def __init__(self, vocab: int, groups: int, device):
        if math.gcd(STRIDE, vocab) != 1:
            raise ValueError(f"the sweep needs a vocabulary coprime with {STRIDE}, not {vocab}")
        self.vocab = vocab
        one = STRIDE * torch.arange(vocab, device=device) % vocab
        self.sweep = torch.cat([one, one])  # a window may run past the end
        self.places = torch.tensor([vocab * g // groups for g in range(groups)], device=device)

    def build(self, targets: Tensor, size: int, first: int) -> Tensor:
        """The sorted (G, size) candidate ids of groups first .. first + G - 1, whose (G, rows)
        targets are given (no negative ids); all G at once (a few kernels, not a few a
        group). A group's distinct targets must not outnumber ``size`` (a device-side assert:
        no sync)."""
        groups, vocab, device = targets.size(0), self.vocab, targets.device
        chosen = torch.zeros(groups, vocab, dtype=torch.bool, device=device)
        chosen.scatter_(1, targets, True)
        need = size - chosen.sum(1)
        torch._assert_async((need >= 0).all(),
                             "more distinct targets than sampled-softmax candidates")
        # as the record: read min(V, int(1.7 need) + 256) ids of the sweep (none when need is 0)
        draw = torch.where(need > 0, torch.clamp((need.double() * DRAW_FACTOR).floor().long()
                                                 + DRAW_EXTRA, max=vocab), 0)
        longest = min(vocab, int(size * DRAW_FACTOR) + DRAW_EXTRA)
        place = self.places[first:first + groups]
        steps = torch.arange(longest, device=device)
        window = self.sweep[place[:, None] + steps]  # distinct ids: longest <= vocab
        free = (steps < draw[:, None]) & ~chosen.gather(1, window)
        taken = free & (free.cumsum(1) <= need[:, None])
        # the record's fallback when the window holds too few: every k-th id left, in order
        spare = ~chosen
        rank = spare.cumsum(1) - 1
        every = torch.clamp(spare.sum(1) // torch.clamp(need, min=1), min=1)[:, None]
        fallback = spare & (rank % every == 0) & (rank // every < need[:, None])
        short = (free.sum(1) < need)[:, None]
        chosen = chosen | (fallback & short)
        chosen.scatter_(1, window, chosen.gather(1, window) | (taken & ~short))
        self.places[first:first + groups] = (place + draw) % vocab
        return true_columns(chosen, size)

    def state_dict(self) -> dict:
        return {"places": self.places.cpu().clone()}  # a copy: the places move in place

    def load_state_dict(self, state: dict) -> None:
        self.places.copy_(state["places"])


def mark_set_size_dynamic(candidates: Tensor) -> Tensor:
    """``candidates`` (G, P) with P marked dynamic for torch.compile: one graph then serves every
    set size of the schedule (record #92: 10,240, 14,336 and 24,576), where a static P compiled
    the whole model again for each (README, Sampled softmax)."""
    torch._dynamo.mark_dynamic(candidates, 1)
    return candidates


def positions_in(candidates: Tensor, ids: Tensor) -> Tensor:
    """The position of each id (any shape, -1 for none) in the sorted ``candidates``, or -1
    where it is not among them."""
    found = torch.searchsorted(candidates, ids.clamp_min(0)).clamp_max(candidates.numel() - 1)
    return torch.where((candidates[found] == ids) & (ids >= 0), found, -1)


def sampled_loss(hidden: Tensor, lm_head: Tensor, targets: Tensor, weights: Tensor,
                 candidates: Tensor, softcap_args, fp8: bool) -> Tensor:
    """The mean over the T rows of the softcapped cross-entropy over each group's candidates.
    ``targets`` and ``weights`` (T, J) as ``kernels.linear_softcap_cross_entropy`` takes them
    (ids, -1 absent); ``candidates`` (G, P), G groups of T / G consecutive rows. A target
    outside its group's set is absent (weight 0)."""
    groups = candidates.size(0)
    rows = hidden.size(0) // groups
    total = hidden.new_zeros((), dtype=torch.float32)
    for g in range(groups):
        part = slice(g * rows, (g + 1) * rows)
        where = positions_in(candidates[g], targets[part])
        total = total + kernels.linear_softcap_cross_entropy(
            hidden[part], lm_head[candidates[g]], where, *softcap_args, fp8=fp8,
            weights=torch.where(where >= 0, weights[part], 0.0))
    return total / groups
