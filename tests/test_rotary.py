"""layers/rotary.py: rotary tables, and YaRN as the one owner of windows, frequencies, scale."""

import math

import pytest
import torch

from layers.rotary import Yarn, rotary_frequencies, rotary_tables


def make_yarn():
    """The tiny model's geometry: head_dim 32, half of it rotating, 16-token blocks."""
    return Yarn(head_dim=32, rope_fraction=0.5, rope_base=1024.0, attn_scale=0.12,
                block_size=16, alpha=1.0, beta=32.0, attn_factor=0.2)


def test_yarn_matches_formula():
    yarn = make_yarn()
    yarn.set_windows((10, 20))
    base = yarn.rotary_freqs.clone().double()
    yarn.set_windows((30, 60))
    old, new = 20 * 16, 60 * 16
    expected = []
    for f in base.tolist():
        turns = old * f / (2 * math.pi)
        ramp = min(max((turns - 1) / (32 - 1), 0.0), 1.0)
        expected.append(f * (ramp + (1 - ramp) * old / new))
    torch.testing.assert_close(yarn.rotary_freqs.double(), torch.tensor(expected).double())
    assert yarn.attn_scale.item() == pytest.approx(0.12 * (1 + 0.2 * math.log(3)))
    # the zero-frequency half and the fastest dims are untouched, the slowest are divided by 3
    assert yarn.rotary_freqs[0] == base[0]
    assert yarn.rotary_freqs[7].item() == pytest.approx(base[7].item() / 3)
    assert (yarn.rotary_freqs[8:] == 0).all()
    # extending for validation without YaRN only changes the windows
    freqs = yarn.rotary_freqs.clone()
    yarn.set_windows((40, 80), yarn=False)
    assert torch.equal(yarn.rotary_freqs, freqs) and yarn.windows.tolist() == [40, 80]


def test_first_set_windows_applies_no_yarn_and_a_repeat_changes_nothing():
    yarn = make_yarn()
    base = yarn.rotary_freqs.clone()
    yarn.set_windows((3, 7))
    assert torch.equal(yarn.rotary_freqs, base) and yarn.attn_scale.item() == pytest.approx(0.12)
    yarn.set_windows((4, 7))  # the short window alone: no YaRN
    assert torch.equal(yarn.rotary_freqs, base) and yarn.windows.tolist() == [4, 7]
    yarn.set_windows((4, 9))
    scaled = yarn.attn_scale.item()
    yarn.set_windows((4, 9))
    assert yarn.attn_scale.item() == scaled


def test_windows_travel_in_the_state_dict():
    yarn = make_yarn()
    yarn.set_windows((2, 4))
    yarn.set_windows((3, 8))
    fresh = make_yarn()
    fresh.load_state_dict(yarn.state_dict())
    assert fresh.current == (3, 8) and fresh.windows.tolist() == [3, 8]
    assert torch.equal(fresh.rotary_freqs, yarn.rotary_freqs)
    assert fresh.attn_scale.item() == yarn.attn_scale.item()
    fresh.set_windows((3, 16))  # YaRN from the loaded long window, as in the saved run
    yarn.set_windows((3, 16))
    assert torch.equal(fresh.rotary_freqs, yarn.rotary_freqs)
    unset = make_yarn()
    unset.load_state_dict(make_yarn().state_dict())
    assert unset.current is None


def test_rotary_tables_are_cos_and_sin_of_position_times_frequency():
    """One op, also when traced (aot_eager checks its fake registration), so that inductor keeps
    the tables instead of re-evaluating sin and cos in every layer."""
    freqs = rotary_frequencies(16, 0.5, 1024.0).float()
    tables = torch.compile(rotary_tables, backend="aot_eager", fullgraph=True)(freqs, 40)
    angles = torch.arange(40.0)[:, None] * freqs[None, :]
    for got, expected in zip(tables, (angles.cos(), angles.sin()), strict=True):
        assert got.shape == (1, 40, 1, 8)
        torch.testing.assert_close(got[0, :, 0], expected)
