"""Record #89's schedule, step by step, against the record's own code (reference data in
tests/reference/record89/, README there): config/record89.py's stage table through
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
    return run.build_config(run.load_config(REPO_ROOT / "config" / "record89.py")).schedule


def assert_plan_is_the_records(plan, want):
    """The columns both records' references have."""
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


def test_every_step_matches_the_record(reference, schedule):
    steps, _ = reference
    assert schedule.total == len(steps) == 1285
    for want in steps:
        assert_plan_is_the_records(schedule.at(want["step"]), want)


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


RECORD92 = REPO_ROOT / "tests" / "reference" / "record92"


@pytest.mark.parametrize("growth,reference,total", [(0, "schedule.json", 1194),
                                                    (None, "schedule_growth88.json", 1230)])
def test_record92_schedule_matches_the_record_at_every_step(growth, reference, total):
    """config/record92.py's stage table against record #92's own schedule code at every step:
    the grown third stage, the batch taper, the cooldown from step 234 to an absolute
    0.30, the momentum (ANVIL's) to 0.93, the stepped prefix weight, the untie inside the
    extension, the sampled softmax's candidates, the document cap of 3072 with attention
    segments of 2560 from the third stage on, and the embedding tables' Adam every fourth step
    from step 336, with squared betas and twice the decay. Twice: the record's own 1194 steps
    (``grown_schedule(0)``), and the config's 36 steps more against the record's code with its
    growth set to 88."""
    from config import record92

    data = json.loads((RECORD92 / reference).read_text())
    steps = [dict(zip(data["columns"], row, strict=True)) for row in data["steps"]]
    raw = run.load_config(REPO_ROOT / "config" / "record92.py")
    if growth is not None:
        raw["schedule"] = record92.grown_schedule(growth)
    config = run.build_config(raw)
    schedule, optimizer = config.schedule, config.optimizer
    betas = optimizer.label_betas["value_embed"]
    assert optimizer.label_betas["bigram_embed"] == betas
    wd_mul = optimizer.label_wd_mul["value_embed"]
    assert optimizer.label_wd_mul["bigram_embed"] == wd_mul
    assert schedule.total == len(steps) == total
    assert schedule.starts + [schedule.total] == data["constants"]["stage_ends"]
    for want in steps:
        plan = schedule.at(want["step"])
        assert_plan_is_the_records(plan, want)
        where = f"step {want['step']}"
        assert min(plan.max_seq_len, schedule.config.attention_segment_cap) == want[
            "attn_segment_cap"], where
        assert plan.candidates == want["sns_candidates"], where
        # the embedding tables' Adam: when, and as how many of Adam's steps (betas to that
        # power, decay times it: the record's (0.75, 0.95) -> squared, wd_mul 5 -> 10)
        assert (plan.adam and plan.tables) == want["embed_table_adam_step"], where
        assert [b**plan.table_pace for b in betas] == want["embed_table_betas"], where
        assert wd_mul * plan.table_pace == want["embed_table_wd_mul"], where
    final = data["final_validation"]
    assert schedule.validation_windows == (final["short_window_blocks"],
                                           final["long_window_blocks"])
