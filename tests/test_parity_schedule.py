"""Record #89's schedule, step by step, against the record's own code (reference data in
tests/reference/record89/, README there): config/base.py's stage table through
``Schedule.at`` must give the record's tokens, segment length, windows, learning-rate
multiplier, momentum, MTP and prefix weights, Adam steps and untie, at every one of its 1285
steps."""

import json

import pytest

import run
from utils import REPO_ROOT

REFERENCE = REPO_ROOT / "tests" / "reference" / "record89" / "schedule.json"


@pytest.fixture(scope="module")
def reference():
    data = json.loads(REFERENCE.read_text())
    return [dict(zip(data["columns"], row, strict=True)) for row in data["steps"]], data


@pytest.fixture(scope="module")
def schedule():
    return run.build_config(run.load_config(REPO_ROOT / "config" / "base.py")).schedule


def test_every_step_matches_the_record(reference, schedule):
    steps, _ = reference
    assert schedule.total == len(steps) == 1285
    for want in steps:
        plan = schedule.at(want["step"])
        where = f"step {want['step']}"
        assert plan.stage == want["stage"], where
        assert plan.tokens == want["tokens"], where
        assert plan.max_seq_len == want["train_max_seq_len"], where
        assert plan.windows == (want["short_window_blocks"], want["long_window_blocks"]), where
        # float64 here, the same formulas; the record's MTP weights are float32 tensors
        assert plan.lr_factor == pytest.approx(want["lr_multiplier"], rel=1e-12), where
        assert plan.momentum == pytest.approx(want["muon_momentum"], rel=1e-12), where
        assert plan.mtp_weights == pytest.approx(want["mtp_weights"], rel=1e-7, abs=1e-12), where
        assert plan.prefix_weight == pytest.approx(want["prefix_weight"], rel=1e-7), where
        assert plan.adam == want["adam_step"], where
        assert plan.untied == (not want["embed_tied"]), where


def test_windows_grow_with_yarn_at_the_records_steps(reference, schedule):
    """YaRN at each growth of the long window (the record's attention scale, stage by stage)
    and none for the final validation's longer window."""
    from layers.rotary import Yarn

    steps, data = reference
    yarn = Yarn(head_dim=128, rope_fraction=0.5, rope_base=1024.0, attn_scale=0.1,
                block_size=128, alpha=1.0, beta=32.0, attn_factor=0.2)
    for want in steps:
        yarn.set_windows(schedule.at(want["step"]).windows)
        assert yarn.attn_scale.item() == pytest.approx(want["attn_scale"], rel=1e-6)
    yarn.set_windows(schedule.validation_windows, yarn=False)
    final = data["final_validation"]
    assert schedule.validation_windows == (final["short_window_blocks"],
                                           final["long_window_blocks"])
    assert yarn.attn_scale.item() == pytest.approx(final["attn_scale"], rel=1e-6)
