"""Rotary position embedding, and YaRN: the attention geometry that changes during training.

The long attention window grows during training (``schedule.Schedule``). Rotary dims that turn
less than about once over the old window have never seen the longer distances, so YaRN
("by parts") slows them down by old/new, leaves fast dims alone, blends in between, and raises
the attention scale by 1 + factor * ln(new / old). ``Yarn`` owns the windows, the frequencies
and the scale, as device tensors (a window change then recompiles nothing), with a Python copy
of the windows so that the trainer never reads them back from the device.
"""

import math

import torch
from torch import Tensor, nn


def rotary_frequencies(head_dim: int, fraction: float, base: float) -> Tensor:
    """Angular frequency (radians per token) of each of the head_dim/2 rotation pairs.

    The first ``fraction`` of the pairs rotate, from 1 down to 1/base radians per token; the
    remaining pairs have frequency 0 and so carry content only, no position.
    """
    pairs = head_dim // 2
    rotating = round(pairs * fraction)
    freqs = (1.0 / base) ** torch.linspace(0, 1, rotating, dtype=torch.float64)
    return torch.cat([freqs, torch.zeros(pairs - rotating, dtype=torch.float64)])


def yarn_frequencies(freqs: Tensor, old_window: int, new_window: int, alpha: float,
                     beta: float) -> Tensor:
    """YaRN by parts: fast dims keep their frequency, slow dims are divided by new/old."""
    turns = old_window * freqs / (2 * math.pi)
    ramp = ((turns - alpha) / (beta - alpha)).clamp(0, 1)
    shrink = old_window / new_window
    return freqs * (shrink + ramp * (1 - shrink))


@torch.library.custom_op("speedrun::rotary_tables", mutates_args=())
def rotary_tables(freqs: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """cos and sin of position * frequency, each (1, length, 1, D/2) in float32, computed once
    a forward pass and read by every layer. An op, so that torch.compile keeps them as tables:
    as plain ops inductor fuses sin and cos into each layer's norm and rotation kernels and
    evaluates them again for every head and layer (README, Speed)."""
    positions = torch.arange(length, device=freqs.device, dtype=torch.float32)
    angles = positions[:, None] * freqs.float()[None, :]
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


@rotary_tables.register_fake
def _(freqs, length):
    shape = (1, length, 1, freqs.numel())
    return freqs.new_empty(shape, dtype=torch.float32), freqs.new_empty(shape, dtype=torch.float32)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (1, T, H, D) by position: pair j is (x[..., j], x[..., j + D/2])."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


class Yarn(nn.Module):
    """The attention windows (short, long) in blocks, the rotary frequencies and the attention
    scale, and the one place that changes them (``set_windows``).

    With ``short_dim`` (record #92's narrow heads) a second set for the short-window layers:
    ``short_dim``-wide heads rotating every dim (the same frequencies as the long set's rotating
    pairs) with their own scale, rescaled for the short window's growth when the long window
    grows, as the record's three tables are."""

    def __init__(self, head_dim: int, rope_fraction: float, rope_base: float, attn_scale: float,
                 block_size: int, alpha: float, beta: float, attn_factor: float,
                 short_dim: int = 0, short_attn_scale: float = 0.0):
        super().__init__()
        self.block_size, self.alpha, self.beta, self.attn_factor = (block_size, alpha, beta,
                                                                     attn_factor)
        # Not in the state dict: the Python copy (the extra state) is, and sets it on loading.
        self.register_buffer("windows", torch.zeros(2, dtype=torch.int32), persistent=False)
        self.register_buffer("rotary_freqs",
                             rotary_frequencies(head_dim, rope_fraction, rope_base).float())
        self.register_buffer("attn_scale", torch.tensor(attn_scale))
        self.register_buffer("short_freqs", rotary_frequencies(short_dim, 1.0, rope_base).float()
                             if short_dim else None)
        self.register_buffer("short_scale", torch.tensor(short_attn_scale) if short_dim else None)
        self.current = None  # (short, long) as last set; None before the first set

    def set_windows(self, windows: tuple[int, int], yarn: bool = True) -> None:
        """Use these windows from now on. When the long window changes (not on the first set)
        and ``yarn`` is on, rescale frequencies and attention scale for the new length. Final
        validation extends the window with ``yarn=False``, as the speedrun does."""
        windows = tuple(int(w) for w in windows)
        if windows == self.current:
            return
        if yarn and self.current is not None and self.current[1] != windows[1]:
            self._rescale(self.rotary_freqs, self.attn_scale, self.current[1], windows[1])
            if self.short_freqs is not None:
                self._rescale(self.short_freqs, self.short_scale, self.current[0], windows[0])
        self.windows.copy_(torch.tensor(windows, dtype=torch.int32))
        self.current = windows

    def _rescale(self, freqs: Tensor, scale: Tensor, old: int, new: int) -> None:
        old, new = old * self.block_size, new * self.block_size
        freqs.copy_(yarn_frequencies(freqs.double(), old, new, self.alpha, self.beta))
        scale.mul_(1 + self.attn_factor * math.log(new / old))

    def tables(self, length: int) -> tuple[Tensor, Tensor]:
        return rotary_tables(self.rotary_freqs, length)

    def get_extra_state(self):
        return {"windows": self.current}

    def set_extra_state(self, state):
        self.current = None if state["windows"] is None else tuple(state["windows"])
        self.windows.copy_(torch.tensor(self.current or (0, 0), dtype=torch.int32))


def apply_rotary_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (..., D) by position with adjacent pairs (x[2j], x[2j+1]) for the first
    cos.size(-1) pairs, the rest unrotated (record #89's layout); cos and sin broadcast to
    (..., pairs)."""
    pairs = cos.size(-1)
    rotating, still = x[..., :2 * pairs].float(), x[..., 2 * pairs:]
    x1, x2 = rotating.unflatten(-1, (pairs, 2)).unbind(-1)
    rotated = torch.stack([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated.type_as(x), still], dim=-1)
