"""train.py: the stage table, gradient accumulation, transitions, resume, failures; run.py's
training mode end to end, records and their summary, the benchmark mode."""

import glob
import gzip
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoints
import run
import train
import utils
from data.loader import BOSFinder
from data.shards import BOS_ID, read_shard, write_shard
from records import summary
from records.write import git_commit

CPU = utils.DeviceInfo("cpu", "cpu", "cpu", (0, 0), 0, None)


def make_shard(path, num_tokens, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50000, num_tokens, dtype=np.uint16)
    starts = np.cumsum(rng.integers(10, 120, num_tokens // 10))
    tokens[0] = BOS_ID
    tokens[starts[starts < num_tokens]] = BOS_ID
    write_shard(path, tokens)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


def write_tiny_shards(folder):
    make_shard(folder / "tiny_train_000000.bin", 40_000, 0)
    make_shard(folder / "tiny_train_000001.bin", 20_000, 1)
    make_shard(folder / "tiny_val_000000.bin", 5_000, 2)
    return folder


@pytest.fixture
def config(tmp_path, data_dir):
    return tiny_config(tmp_path, data_dir)


def tiny_config(tmp_path, data_dir):
    """config/cpu.py shrunk to seconds: 12 + 2 steps, stages at steps 4 and 8, untie at 6."""
    config = run.load_config(utils.REPO_ROOT / "config" / "cpu.py")
    config["model_config"].update(model_dim=32, num_heads=2, head_dim=16, ffn_dim=64,
                                  block_size=16, dc_window=14, bigram_rows=512,
                                  bigram_sign_rows=32, gate_hidden=8, mudd_hidden=8,
                                  prefix_prediction=False)
    config["training_config"].update(
        max_seq_len=64, batch_size_multiple=2, val_tokens=256, val_chunk_tokens=128,
        val_loss_every=5, checkpoint_dir=str(tmp_path / "ckpt"),
        records_dir=str(tmp_path / "records"), target_val_loss=40.0)
    config["schedule"].update(
        num_scheduled_iterations=12, num_extension_iterations=2, split_frac=0.5,
        freeze_scalars_steps=2, momentum_warmup_steps=3, momentum_cooldown_steps=2,
        cooldown_frac=0.5, final_lr_ratio=0.1, final_lr_absolute=False, adam_every=1,
        stages=(dict(duration=1 / 3, tokens=128, windows=(1, 2), lr_mul=1.0, max_seq_len=32,
                     mtp_weights=(1.0, 0.5), mtp_weights_end=(1.0, 0.0)),
                dict(duration=1 / 3, tokens=256, windows=(1, 3), lr_mul=1.52),
                dict(duration=1 / 3, tokens=256, windows=(2, 4), lr_mul=1.73),
                dict(tokens=256, windows=(2, 5), lr_mul=1.73)),
        validation_windows=(3, 6))
    config["data_config"].update(train_pattern=str(data_dir / "tiny_train_*.bin"),
                                 val_pattern=str(data_dir / "tiny_val_*.bin"), prefetch=False)
    config["logging_config"].update(log_dir=str(tmp_path / "logs"), progress_bar=False)
    return config


def make_logger(config, tmp_path):
    return train.RunLogger(tmp_path / "log.txt", run.build_config(config).logging, config, 14,
                           "test")


def manager_for(config, tmp_path):
    return train.TrainingManager(run.build_config(config), CPU, make_logger(config, tmp_path))


def losses_of(manager, steps):
    return [manager.train_step().item() for _ in range(steps)]


def resumed_losses(config, tmp_path, at, steps):
    """The losses of ``steps`` steps of a fresh manager resumed from a checkpoint that another
    wrote after ``at`` steps."""
    first = manager_for(config, tmp_path)
    losses_of(first, at)
    path = first.save_checkpoint(tmp_path / "ckpt" / "mid.pt")
    resumed = manager_for(config, tmp_path)
    resumed.load_checkpoint(path)
    return losses_of(resumed, steps)


# -- schedule --------------------------------------------------------------------------------


def test_schedule_stages_and_factors(config):
    s = run.build_config(config).schedule
    plans = [s.at(i) for i in range(14)]
    assert s.total == 14 and s.micro_batch_tokens == 128 and s.untie_step == 6
    assert [plans[i].tokens for i in (0, 3, 4, 8, 13)] == [128, 128, 256, 256, 256]
    assert [plans[i].accumulation for i in (0, 4)] == [1, 2]
    assert [plans[i].windows for i in (0, 4, 8, 11, 12)] == [(1, 2), (1, 3), (2, 4), (2, 4),
                                                              (2, 5)]
    assert [p.stage for p in plans] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 2
    assert s.validation_windows == (3, 6)
    assert [p.step for p in plans if p.transition] == [4, 8, 12]
    assert [p.untied for p in plans] == [False] * 6 + [True] * 8
    assert s.spans() == [(0, 4), (4, 8), (8, 12), (12, 14)]
    # flat for the first half, then linear to final_lr_ratio, times the stage multiplier
    assert plans[0].lr_factor == 1.0 and plans[5].lr_factor == pytest.approx(1.52)
    assert plans[9].lr_factor == pytest.approx((1 + 0.5 * (0.1 - 1)) * 1.73)
    assert plans[12].lr_factor == plans[13].lr_factor == pytest.approx(0.1 * 1.73)
    assert [plans[i].momentum for i in (0, 3, 11, 12, 13)] == pytest.approx(
        [0.85, 0.95, 0.95, 0.95, 0.90])


def test_stepped_prefix_weight_and_an_absolute_untie_step(config):
    """prefix_weight_levels holds the weight in equal steps over the stage (record #92's
    0.20 / 0.15 / 0.10 / 0.05); untie_step replaces split_frac and may fall in the extension."""
    stages = config["schedule"]["stages"]
    config["schedule"].update(untie_step=13, stages=(
        stages[0], dict(stages[1], prefix_weight=0.2, prefix_weight_end=0.0,
                        prefix_weight_levels=2), *stages[2:]))
    s = run.build_config(config).schedule
    assert [s.at(i).prefix_weight for i in range(3, 9)] == pytest.approx(
        [0.0, 0.2, 0.2, 0.1, 0.1, 0.0])
    assert [s.at(i).untied for i in (11, 12, 13)] == [False, False, True]
    for key, value, message in [
            ("untie_step", 15, "untie_step must be None or a step from 0 to the run's 14"),
            ("untie_step", 2.5, "untie_step. expects int or None"),
            ("prefix_weight_levels", -1, "prefix_weight_levels must be an int >= 0"),
            ("prefix_weight_end", None, "prefix_weight_levels steps the prefix weight")]:
        if key == "untie_step":
            config["schedule"]["untie_step"] = value
        else:
            row = dict(stages[1], prefix_weight_end=0.0, prefix_weight_levels=2)
            config["schedule"].update(untie_step=None,
                                      stages=(stages[0], {**row, key: value}, *stages[2:]))
        with pytest.raises(utils.ConfigError, match=message):
            run.build_config(config)


def test_long_segments_and_the_attention_segment_cap(config, tmp_path):
    """A stage's segments may be longer than training_config.max_seq_len, up to the
    micro-batch (record #92's 3072 over 2048), and attention_segment_cap then cuts training's
    attention into segments (record #92's 2560); validation keeps whole documents."""
    stages = config["schedule"]["stages"]
    config["schedule"]["stages"] = (*stages[:2], dict(stages[2], max_seq_len=128), stages[3])
    assert run.build_config(config).schedule.at(8).max_seq_len == 128
    whole = manager_for(config, tmp_path)
    config["schedule"]["attention_segment_cap"] = 24
    capped = manager_for(config, tmp_path)
    seen = []
    real = train.document_ids
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "document_ids", lambda x, cap=0: seen.append(cap) or real(x, cap))
        assert losses_of(whole, 4) != losses_of(capped, 4)
        capped.validate()
    assert seen == [0] * 4 + [24] * 4 + [0] * (len(seen) - 8) and len(seen) > 8
    config["schedule"]["stages"] = (*stages[:2], dict(stages[2], max_seq_len=129), stages[3])
    with pytest.raises(utils.ConfigError, match="max_seq_len 129 must be between 1 and the "
                                                "micro-batch \\(128"):
        run.build_config(config)


def test_a_stage_that_changes_nothing_is_no_transition(config):
    stages = config["schedule"]["stages"]
    config["schedule"]["stages"] = (*stages[:3], dict(stages[3], windows=(2, 4)))
    s = run.build_config(config).schedule
    assert [i for i in range(14) if s.at(i).transition] == [4, 8]
    assert s.spans() == [(0, 4), (4, 8), (8, 12), (12, 14)]


def test_config_rejects_val_tokens_off_the_micro_batch(config):
    config["training_config"]["val_tokens"] = 300
    with pytest.raises(utils.ConfigError, match="val_tokens \\(300\\) must be a positive multiple"):
        run.build_config(config)


def test_schedule_rejects_bad_tables(config):
    stages = config["schedule"]["stages"]
    config["schedule"]["stages"] = (stages[0], dict(stages[1], tokens=200), *stages[2:])
    with pytest.raises(utils.ConfigError, match="200 is not a multiple of the micro-batch"):
        run.build_config(config)
    config["schedule"]["stages"] = (stages[0], dict(stages[1], duration=0.5), *stages[2:])
    with pytest.raises(utils.ConfigError, match="durations sum to 1.1666"):
        run.build_config(config)
    config["schedule"]["stages"] = stages[:3]
    with pytest.raises(utils.ConfigError, match="the last row is the extension"):
        run.build_config(config)
    config["schedule"]["stages"] = (stages[0], dict(stages[1], windows=(0, 3)), *stages[2:])
    with pytest.raises(utils.ConfigError, match="two positive ints"):
        run.build_config(config)
    config["schedule"]["stages"] = (stages[0], dict(stages[1], mtp=1), *stages[2:])
    with pytest.raises(utils.ConfigError, match=r"stages\[1\]: unknown keys \['mtp'\]"):
        run.build_config(config)
    config["schedule"].update(stages=stages, num_scheduled_iterations=2)
    with pytest.raises(utils.ConfigError, match="a stage gets no steps of the 2 scheduled"):
        run.build_config(config)


# -- the step ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sum_loss_scale", [None, 1 / 8])
def test_a_steps_gradient_is_the_mean_or_the_scaled_sum_over_its_tokens(config, tmp_path,
                                                                        sum_loss_scale):
    """The gradient accumulate() leaves for a step of two 128-token micro-batches: the mean
    over the step's 256 tokens of their losses' gradients, or sum_loss_scale times the sum
    (record #89 sums its micro-batches' token losses and divides by 8)."""
    config["training_config"]["sum_loss_scale"] = sum_loss_scale
    manager = manager_for(config, tmp_path)
    plan = manager.schedule.at(4)
    manager.apply(plan)
    state = manager.train_loader.state_dict()
    model, weights = manager.model, manager.loss_weights[len(plan.mtp_weights)]
    for _ in range(plan.accumulation):  # the sum over the step's tokens, micro-batch by one
        inputs, targets = manager.train_loader.next_batch()
        (model(inputs, targets, None, weights) * inputs.numel()).backward()
    summed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    manager.train_loader.load_state_dict(state)
    manager.accumulate(plan)
    per_token = 1 / plan.tokens if sum_loss_scale is None else sum_loss_scale
    for name, p in model.named_parameters():
        if name in summed:
            torch.testing.assert_close(p.grad, summed[name] * per_token, rtol=1e-5, atol=1e-9,
                                       msg=name)


def test_each_stage_computes_only_the_targets_it_weighs(config, tmp_path, monkeypatch):
    """The loss op gets the targets the step's stage weighs at some step, no more: in the
    first stage the next token, the one after (0.5 -> 0) and the prefix token (0.25 -> 0);
    from the second stage on, and at validation, the next token alone."""
    import kernels

    config["model_config"]["prefix_prediction"] = True
    config["schedule"]["stages"][0].update(prefix_weight=0.25, prefix_weight_end=0.0)
    op, columns = kernels.linear_softcap_cross_entropy, set()

    def recording_op(hidden, weight, targets, *args, **kwargs):
        columns.add(targets.size(1))
        return op(hidden, weight, targets, *args, **kwargs)

    monkeypatch.setattr(kernels, "linear_softcap_cross_entropy", recording_op)
    manager = manager_for(config, tmp_path)
    seen = []
    for _ in range(manager.schedule.total):
        manager.train_step()
        seen.append(columns.copy())
        columns.clear()
    assert seen == [{3}] * 4 + [{1}] * 10
    manager.validate()
    assert columns == {1}


def test_smoke_run_is_bit_reproducible(config, tmp_path):
    config["training_config"]["seed"] = 123
    first = losses_of(manager_for(config, tmp_path), 10)
    second = losses_of(manager_for(config, tmp_path), 10)
    assert first == second
    config["training_config"]["seed"] = 124
    assert losses_of(manager_for(config, tmp_path), 10) != first


def test_transitions_happen_at_their_steps(config, tmp_path):
    manager = manager_for(config, tmp_path)
    yarn = manager.model.yarn
    changes = []
    set_windows = yarn.set_windows

    def recording(windows, **kwargs):
        if tuple(windows) != yarn.current:
            changes.append((manager.step, tuple(windows)))
        set_windows(windows, **kwargs)

    yarn.set_windows = recording
    freqs_before = yarn.rotary_freqs.clone()
    losses_of(manager, 4)
    assert changes == [(0, (1, 2))]
    assert torch.equal(yarn.rotary_freqs, freqs_before)  # the first set: no YaRN
    scalars = [p for p in manager.model.parameters() if p.label in ("scalar", "gate")]
    before = [p.detach().clone() for p in scalars]
    manager.train_step()  # step 4: window 2 -> 3 (YaRN) and the scalar freeze starts
    assert changes[-1] == (4, (1, 3))
    assert not torch.equal(yarn.rotary_freqs, freqs_before)
    assert yarn.attn_scale.item() == pytest.approx(
        config["model_config"]["attn_scale"] * (1 + 0.2 * math.log(3 / 2)))
    manager.train_step()  # step 5: still frozen (2 steps)
    assert all(torch.equal(p, b) for p, b in zip(scalars, before, strict=True))
    manager.train_step()  # step 6: thawed, and the embedding is untied
    assert not all(torch.equal(p, b) for p, b in zip(scalars, before, strict=True))
    assert not manager.model.tie.tied


def test_untie_copies_optimizer_state(config, tmp_path):
    manager = manager_for(config, tmp_path)
    losses_of(manager, 6)  # steps 0..5, tied
    head = manager.model.lm_head
    head_state = manager.optimizer.state_dict()
    manager.apply(manager.schedule.at(6))
    assert not manager.model.tie.tied
    assert torch.equal(manager.model.embed, head)
    entries = {p["name"]: p["state"] for p in manager.optimizer.state_dict()["params"]}
    saved_head = next(p["state"] for p in head_state["params"] if p["name"] == "lm_head")
    for key, value in entries["lm_head"].items():
        if torch.is_tensor(value):
            assert torch.equal(entries["embed"][key], value), key
            assert torch.equal(saved_head[key], value), key


def test_tied_weights_stay_equal_and_untied_ones_part(config, tmp_path):
    manager = manager_for(config, tmp_path)
    head_before = manager.model.lm_head.detach().clone()
    losses_of(manager, 6)  # steps 0..5, tied
    model = manager.model
    assert model.tie.tied and not torch.equal(model.lm_head, head_before)
    assert torch.equal(model.embed, model.lm_head)
    losses_of(manager, 2)  # steps 6 and 7, untied
    assert not model.tie.tied and not torch.equal(model.embed, model.lm_head)


@pytest.mark.parametrize("adam_every", [1, 2])
def test_resume_equals_uninterrupted(config, tmp_path, adam_every):
    # 14 steps straight against 5 steps, a checkpoint, and a fresh process-like rebuild that
    # resumes: the resumed run crosses a window transition (8), the untie (6) and the extension.
    # With Adam every other step, step 4's gradients wait in the checkpoint for step 5's.
    config["schedule"]["adam_every"] = adam_every
    reference = manager_for(config, tmp_path)
    expected = losses_of(reference, 14)
    first = manager_for(config, tmp_path)
    losses_of(first, 5)
    path = first.save_checkpoint(tmp_path / "ckpt" / "mid.pt")
    losses_of(first, 2)  # whatever happens after the checkpoint must not leak into the resume
    resumed = manager_for(config, tmp_path)
    resumed.load_checkpoint(path)
    assert resumed.step == 5
    assert losses_of(resumed, 9) == expected[5:]


def test_delayed_float8_scales_move_once_a_step_and_resume_exactly(config, tmp_path,
                                                                     monkeypatch):
    """model_config.fp8_delayed_scales, kernels.float8_relu2_mlp forced on the CPU
    (torch._scaled_mm runs there): after each step every MLP's hidden-activation scale is 1.03
    times the largest relu(x @ fc.T)^2 of that step's micro-batches / 448, its gradient's 1.25
    times the largest gradient at pre / 57344 (the first step keeps the initial scale: the
    zero-initialised down projection passes no gradient); the scales change the losses, and a
    resumed run goes on with them exactly."""
    import kernels

    def dequantized(t, dtype=torch.float8_e4m3fn):
        t8, scale = kernels.to_float8(t.detach().reshape(-1, t.size(-1)), dtype)
        return t8.float() * scale

    monkeypatch.setattr(kernels, "use_fp8", lambda hidden, weight, fp8: fp8)
    monkeypatch.setattr(kernels, "use_relu2_mlp", lambda x, fc, proj: True)
    seen = {}  # (weight, kind) -> largest |value| of the step
    float8_relu2_mlp = kernels.float8_relu2_mlp

    def keep(key, value):
        seen[key] = max(seen.get(key, 0.0), value)

    def watched(x, fc, proj, post, grad):
        out = float8_relu2_mlp(x, fc, proj, post, grad)
        pre = dequantized(x) @ dequantized(fc).t()
        keep((fc, "post"), pre.relu().square().max().item())
        if out.requires_grad:
            out.register_hook(lambda g: keep((fc, "grad"), (2 * (
                dequantized(g, torch.float8_e5m2) @ dequantized(proj)) * pre.relu()).abs()
                .max().item()))
        return out

    monkeypatch.setattr(kernels, "float8_relu2_mlp", watched)
    config["model_config"].update(fp8_mlp=True, fp8_lm_head=False, fp8_attn=False,
                                  fp8_delayed_scales=False)
    dynamic = losses_of(manager_for(config, tmp_path), 4)
    config["model_config"]["fp8_delayed_scales"] = True
    manager = manager_for(config, tmp_path)
    mlps = [m for m in manager.model.modules() if getattr(m, "delayed", False)]
    assert len(mlps) == sum(b.mlp is not None for b in manager.model.blocks) > 0
    losses = []
    for step in range(4):
        seen.clear()
        losses.append(manager.train_step().item())
        for mlp in mlps:
            post = seen[mlp.fc, "post"] * 1.03 / 448
            assert mlp.post_scale.item() == pytest.approx(post, rel=1e-4)
            grad = seen[mlp.fc, "grad"]
            assert grad > 0 or step == 0
            want = 2.0 ** -6 if step == 0 else grad * 1.25 / 57344
            assert mlp.grad_scale.item() == pytest.approx(want, rel=1e-4)
            assert mlp.post_amax.item() == mlp.grad_amax.item() == 0.0
    assert losses != dynamic and losses[0] == pytest.approx(dynamic[0], rel=0.05)
    assert resumed_losses(config, tmp_path, 4, 3) == losses_of(manager, 3)


def test_tables_step_at_their_own_pace_and_resume_exactly(config, tmp_path):
    """schedule.table_adam_every: from step 4 the embedding tables move only on steps 3 mod 4,
    the other Adam parameters on every odd step; a checkpoint at step 5 holds the tables' two
    steps of gradients and the resumed run equals the uninterrupted one."""
    from optimizers import TABLE_LABELS

    config["schedule"].update(adam_every=2, table_adam_every=4, table_adam_from=4)
    reference = manager_for(config, tmp_path)
    tables = [p for p in reference.model.parameters() if p.label in TABLE_LABELS]
    head = reference.model.lm_head
    assert tables
    moved, head_moved, expected = [], [], []
    for step in range(14):
        before, head_before = [p.detach().clone() for p in tables], head.detach().clone()
        expected.append(reference.train_step().item())
        changed = [not torch.equal(p, b) for p, b in zip(tables, before, strict=True)]
        assert len(set(changed)) == 1, step
        moved.append(changed[0])
        head_moved.append(not torch.equal(head, head_before))
    assert [s for s in range(14) if moved[s]] == [1, 3, 7, 11]
    assert [s for s in range(14) if head_moved[s]] == [1, 3, 5, 7, 9, 11, 13]
    assert resumed_losses(config, tmp_path, 5, 9) == expected[5:]


@pytest.mark.parametrize("adam_every", [1, 2])
def test_table_grads_in_place_train_as_autograd(config, tmp_path, adam_every):
    # 14 steps with the tables' gradients added in place against autograd's own: across the
    # untie (6), the stages, Adam's gradients waiting a step (adam_every 2) and a resume from a
    # checkpoint taken at 5. Only the order of the additions differs.
    config["schedule"]["adam_every"] = adam_every
    expected = losses_of(manager_for(config, tmp_path), 14)
    config["training_config"]["table_grads_in_place"] = True
    first = manager_for(config, tmp_path)
    got = losses_of(first, 5)
    path = first.save_checkpoint(tmp_path / "ckpt" / "mid.pt")
    resumed = manager_for(config, tmp_path)
    resumed.load_checkpoint(path)
    got += losses_of(resumed, 9)
    assert got == pytest.approx(expected, rel=1e-5)
    assert any(table is resumed.model.bigram.table for table, _ in resumed.table_grads)


def test_ngram_row_grads_train_as_the_dense_gradient(config, tmp_path):
    """The n-gram table's gradient kept as rows (training_config.ngram_row_grads) against its
    dense gradient, the tables stepping every fourth step from step 4 (their rows held over
    four steps): the first update of the table equal to float32's rounding, 14 losses to
    1e-5 (later updates differ more: Adam makes a row's rounding a step of its own, and the
    tiny model's few rows per step make that chaotic); with rows, a checkpoint after step 5
    (the rows of steps 4 and 5 held) resumes exactly, after a warm-up that changes nothing."""
    config["model_config"]["ngram_table"] = True
    config["schedule"].update(adam_every=2, table_adam_every=4, table_adam_from=4)
    dense = manager_for(config, tmp_path)
    expected = losses_of(dense, 2)
    config["training_config"]["ngram_row_grads"] = True
    rows = manager_for(config, tmp_path)
    got = losses_of(rows, 2)
    assert rows.model.bigram.table.grad is None and rows.row_grads.used == 0
    torch.testing.assert_close(rows.model.bigram.table, dense.model.bigram.table, rtol=0,
                               atol=1e-6)
    assert rows.model.bigram.table.abs().max() > 1e-3  # it moved
    expected += losses_of(dense, 12)
    got += losses_of(rows, 12)
    assert got == pytest.approx(expected, rel=1e-5)
    first = manager_for(config, tmp_path)
    first.warmup()
    assert [name for name, _ in first.warmup_phases] == [
        "first step", "Adam's step", "the tables' Adam at pace 2",
        "loss of 1 token ahead, full softmax"]  # the stages after the first weigh one token
    assert losses_of(first, 6) == got[:6]
    # two steps of two micro-batches, two rows a token
    assert first.row_grads.used == 2 * 2 * first.tc.micro_batch_tokens * 2
    path = first.save_checkpoint(tmp_path / "ckpt" / "mid.pt")
    resumed = manager_for(config, tmp_path)
    resumed.load_checkpoint(path)
    assert losses_of(resumed, 8) == got[6:]
    assert torch.equal(resumed.model.bigram.table, rows.model.bigram.table)


def test_ngram_row_grads_refusals(config):
    config["training_config"]["ngram_row_grads"] = True
    with pytest.raises(utils.ConfigError, match="needs model_config.ngram_table"):
        run.build_config(config)
    config["model_config"]["ngram_table"] = True
    config["training_config"]["table_grads_in_place"] = True
    with pytest.raises(utils.ConfigError, match="without a dense gradient"):
        run.build_config(config)


def sampled(config, pairs=((0, 512), (4, 1024), (10, 0)), rows=64):
    config["schedule"].update(sampled_softmax=pairs, sampled_softmax_rows=rows)
    return config


def test_sampled_softmax_schedule_and_refusals(config, tmp_path):
    schedule = run.build_config(sampled(config)).schedule
    assert [schedule.at(s).candidates for s in (0, 3, 4, 9, 10, 13)] == [512, 512, 1024, 1024,
                                                                          0, 0]
    for pairs, message in ((((0, 500),), "multiple of 16"), (((4, 512), (0, 256)), "ascending"),
                           (((0, -16),), "non-negative")):
        with pytest.raises(utils.ConfigError, match=message):
            run.build_config(sampled(config, pairs))
    with pytest.raises(utils.ConfigError, match="sampled_softmax_rows \\(96\\) must divide"):
        run.build_config(sampled(config, rows=96))
    with pytest.raises(utils.ConfigError, match="asks 65536 candidates"):
        manager_for(sampled(config, ((0, 65536),)), tmp_path)


@pytest.mark.parametrize("adam_every", [1, 2])
def test_sampled_softmax_trains_resumes_and_warms_up_exactly(config, tmp_path, adam_every):
    """Sampled softmax over 512, then 1024 candidates, then the full softmax from step 10: the
    losses are the sampled ones until then (smaller: fewer classes), a run resumed from a
    checkpoint at step 5 continues them exactly (the sweep's places are in it), and the
    warm-up, which also compiles each candidate count's graph, changes nothing."""
    config["schedule"]["adam_every"] = adam_every
    full = losses_of(manager_for(config, tmp_path), 14)
    expected = losses_of(manager_for(sampled(config), tmp_path), 14)
    assert all(a < b for a, b in zip(expected[:10], full[:10], strict=True))
    first = manager_for(config, tmp_path)
    losses_of(first, 5)
    path = first.save_checkpoint(tmp_path / "ckpt" / "mid.pt")
    losses_of(first, 2)
    resumed = manager_for(config, tmp_path)
    resumed.load_checkpoint(path)
    assert losses_of(resumed, 9) == expected[5:]
    warmed = manager_for(config, tmp_path)
    warmed.warmup()
    assert [name for name, _ in warmed.warmup_phases] == (
        ["first step"] + ["Adam's step"] * (adam_every - 1)
        + ["loss of 1 token ahead, full softmax",
           "loss of 1 token ahead, over 1024 candidates"])
    assert "first step" in warmed.warmup_summary()
    assert losses_of(warmed, 14) == expected


def test_table_grads_in_place_refused_for_record55():
    config = run.load_config(utils.REPO_ROOT / "config" / "record55.py")
    config["training_config"]["table_grads_in_place"] = True
    with pytest.raises(utils.ConfigError, match="table_grads_in_place"):
        run.build_config(config)


def test_warmup_restores_the_initial_state(config, tmp_path):
    plain = losses_of(manager_for(config, tmp_path), 8)
    warmed = manager_for(config, tmp_path)
    warmed.warmup()
    assert warmed.model.tie.tied and warmed.step == 0 and warmed.model.yarn.current is None
    assert losses_of(warmed, 8) == plain


@pytest.mark.parametrize("adam_every", [1, 2])
def test_warmup_after_resuming_an_untied_run(config, tmp_path, adam_every):
    config["schedule"]["adam_every"] = adam_every
    reference = manager_for(config, tmp_path)
    expected = losses_of(reference, 10)
    first = manager_for(config, tmp_path)
    losses_of(first, 7)  # untied at step 6
    path = first.save_checkpoint(tmp_path / "ckpt" / "late.pt")
    resumed = manager_for(config, tmp_path)
    resumed.load_checkpoint(path)
    resumed.warmup()
    assert not resumed.model.tie.tied and resumed.step == 7
    assert losses_of(resumed, 3) == expected[7:]


def test_nan_loss_stops_with_the_step(config, tmp_path):
    manager = manager_for(config, tmp_path)
    step = manager.train_step

    def poisoned():
        if manager.step == 3:
            with torch.no_grad():
                manager.model.blocks[0].mlp.fc.fill_(float("nan"))
        return step()

    manager.train_step = poisoned
    with pytest.raises(train.TrainingError, match="loss is nan at step 4"):
        manager.run()
    assert "step 3/14" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("read_late", [True, False])
def test_a_steps_loss_is_read_once_the_next_step_is_queued(config, tmp_path, read_late):
    """On CUDA (``read_late``, forced here) the loop reads step s's loss (a host sync) after
    step s + 1 is queued, so the device does not wait for the host between steps; at a pause
    (validation, a checkpoint, the end) it reads it at once, and on the CPU always (there it
    would only move step times around). Every step is counted once, in order, and the train
    time is the sum of the steps' times."""
    config["training_config"].update(val_loss_every=5, checkpoint_every=8)
    manager = manager_for(config, tmp_path)
    assert not manager.read_late  # the CPU's
    manager.read_late = read_late
    finished, finish = [], manager.finish_step

    def recorded(step, loss, pause=False):
        finished.append((step, manager.step, pause))
        finish(step, loss, pause)

    manager.finish_step = recorded
    times = []
    log_step = manager.log_step
    manager.log_step = lambda step, loss, step_time: times.append(step_time) or log_step(
        step, loss, step_time)
    manager.run()
    assert [step for step, _, _ in finished] == list(range(1, 15))
    pauses = {5, 8, 10, 14} if read_late else {5, 8, 10}  # the last step read late, at the end
    assert all((queued, pause) == ((step, True) if step in pauses
                                   else (step + read_late, False))
               for step, queued, pause in finished), finished
    assert manager.train_time == pytest.approx(sum(times)) and min(times) > 0


def signal_after(manager, step, signum, times=2):
    """Patch ``manager`` to receive ``signum`` ``times`` times (uv run forwards Ctrl-C, so one
    press arrives twice) as step ``step`` ends."""
    train_step = manager.train_step

    def signalled():
        loss = train_step()
        if manager.step == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return loss

    manager.train_step = signalled


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_then_saves(config, tmp_path, monkeypatch, signum):
    manager = manager_for(config, tmp_path)
    signal_after(manager, 2, signum)
    write = checkpoints.write

    def write_under_fire(*args, **kwargs):  # one more signal as the file is written
        os.kill(os.getpid(), signal.SIGINT)
        return write(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "write", write_under_fire)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(train.Interrupted) as info:
        manager.run()
    assert info.value.signum == signum
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers are put back
    saved = tmp_path / "ckpt" / "cpu_step000002.safetensors"
    name = signal.Signals(signum).name
    assert (f"{name} after step 2: checkpoint saved to {saved}; continue with --resume {saved}"
            in (tmp_path / "log.txt").read_text())
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]  # no .tmp
    _, state = checkpoints.read(saved, kind="checkpoint")
    assert state["step"] == 2 and len(state["history"]) == 0


def test_sigterm_exits_143_with_a_checkpoint(config, tmp_path, monkeypatch):
    step = train.TrainingManager.train_step

    def signalled(manager):
        loss = step(manager)
        if manager.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(train.TrainingManager, "train_step", signalled)
    assert run.run(run.build_config(config), config_path="test") == 143
    (saved,) = (tmp_path / "ckpt").glob("cpu_*_step000003.safetensors")
    assert checkpoints.read(saved)[1]["step"] == 3
    assert not (tmp_path / "records").exists()


def test_ctrl_c_under_uv_run_saves_a_checkpoint_and_exits_130(data_dir, tmp_path):
    # Ctrl-C sends SIGINT to the foreground process group: `uv run` and the trainer; uv, with
    # no terminal, forwards it to the trainer, which so receives two. The process must write a
    # complete checkpoint and exit with 130.
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed")
    process = subprocess.Popen(
        [uv, "run", "--no-sync", "python", "run.py", "--config", "config/cpu.py", "--seed", "1",
         "--val_tokens", "1024", "--val_loss_every", "0", "--log_dir", str(tmp_path),
         "--checkpoint_dir", str(tmp_path / "ckpt")],
        cwd=utils.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "DATA_PATH": str(data_dir)}, start_new_session=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            os.killpg(process.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
            break
    lines += process.stdout.readlines()
    assert process.wait(timeout=120) == 130, "".join(lines)
    (saved,) = (tmp_path / "ckpt").iterdir()
    assert saved.suffix == ".safetensors" and f"continue with --resume {saved}" in "".join(lines)
    assert checkpoints.read(saved)[1]["step"] >= 2


def test_partial_checkpoints_are_removed_and_refused(config, tmp_path, capsys):
    built = run.build_config(config)
    manager = manager_for(config, tmp_path)
    manager.run_id = "0123456789abcdef"
    losses_of(manager, 1)
    complete = manager.write_checkpoint()
    partial = complete.with_name(complete.name + ".tmp")
    partial.write_bytes(complete.read_bytes()[:1000])  # what a killed write leaves
    assert run.run(built, resume=partial) == 2
    err = capsys.readouterr().err
    assert f"{partial} is a partial file left by an interrupted write" in err
    assert f"complete ones in {complete.parent}: {complete.name}" in err
    config["training_config"]["early_stop_steps"] = 1
    manager = manager_for(config, tmp_path)
    manager.run_id = "0123456789abcdef"
    manager.run()
    assert not partial.exists() and complete.exists()
    assert (f"removed {partial}: a partial checkpoint that an interrupted write left"
            in (tmp_path / "log.txt").read_text())


def test_old_checkpoints_are_pruned_and_the_model_is_kept(config, tmp_path):
    config["training_config"].update(checkpoint_every=2, keep_checkpoints=2)
    assert run.run(run.build_config(config), config_path="test") == 0
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("*_step*"))
    assert [name[-22:] for name in kept] == ["_step000012.safetensors"[-22:],
                                            "_step000014.safetensors"[-22:]]
    (figures,) = (tmp_path / "records").glob("*/*.json")
    record = json.loads(figures.read_text())
    (model_file,) = (tmp_path / "ckpt").glob("*_model.safetensors")
    assert record["model"] == str(model_file)
    (log,) = (tmp_path / "logs").glob("*.txt")
    assert f"model written: {model_file}" in log.read_text()
    assert log.read_text().count("(keep_checkpoints=2)") == 5


# -- end to end, records and their summary -----------------------------------------------------


def test_full_run_writes_a_record(config, tmp_path, monkeypatch):
    result = run.run(run.build_config(config), config_path="test")
    assert result == 0
    (folder,) = (tmp_path / "records").iterdir()
    (figures,) = folder.glob("*.json")
    data = json.loads(figures.read_text())
    assert data["steps"] == 14 and data["seed"] == 0 and not data["early_stopped"]
    assert data["tokens"] == 4 * 128 + 10 * 256
    text = figures.with_suffix(".txt").read_text()
    for part in ("==== model.py ====", "==== resolved config ====", "==== environment ====",
                 "torch ", "==== log ====", "final val_loss"):
        assert part in text


def test_resumed_run_continues_its_log_and_record(config, tmp_path):
    """A run split across processes (checkpoint, then --resume) is one run: one run id, one
    log holding both parts, and the record counts the train time of both."""
    tc = config["training_config"]
    tc.update(early_stop_steps=5, checkpoint_every=5)
    assert run.run(run.build_config(config), config_path="test") == 0
    (log,) = (tmp_path / "logs").glob("*.txt")
    tc.update(early_stop_steps=None, checkpoint_every=0)
    (saved,) = (tmp_path / "ckpt").glob(f"cpu_{log.stem[:8]}_step000005.safetensors")
    first_part = checkpoints.read(saved)[1]["train_time"]
    assert run.run(run.build_config(config), resume=saved) == 0
    assert list((tmp_path / "logs").glob("*.txt")) == [log]
    text = log.read_text()
    assert "step 5/14 loss" in text and "resumed from" in text and "step 14/14 loss" in text
    (figures,) = (tmp_path / "records").glob("*/*.json")
    data = json.loads(figures.read_text())
    assert data["run_id"] == log.stem and data["steps"] == 14
    # the second part's steps, as logged (ms, rounded), come on top of the first part's time
    resumed = text.split("resumed from")[1]
    second_part = sum(float(line.split(" step ")[1].split("ms")[0]) / 1000
                      for line in resumed.splitlines() if " loss " in line and "ms " in line)
    assert data["train_time"] == pytest.approx(first_part + second_part, abs=0.01)


def test_unreadable_checkpoint_is_named(config, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert run.run(run.build_config(config), resume=bad) == 2
    assert f"cannot read checkpoint {bad}" in capsys.readouterr().err
    torch.save({"model": {}}, bad)  # an older version's checkpoint: a pickle is never opened
    assert run.run(run.build_config(config), resume=bad) == 2
    assert "looks like a torch.save file" in capsys.readouterr().err
    model = checkpoints.write(tmp_path / "m.safetensors", "model", {"config": {}})
    assert run.run(run.build_config(config), resume=model) == 2
    assert "is a model, not a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["val_id", "train_id", "no_bos"])
def test_bad_shards_stop_before_training_with_exit_2(config, tmp_path, capsys, problem):
    folder = tmp_path / "bad"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("tiny_train_000000.bin", 20_000), ("tiny_val_000000.bin", 5_000)):
        tokens = rng.integers(0, 50000, size)
        tokens[::50] = BOS_ID
        if problem == "no_bos":
            tokens[tokens == BOS_ID] = 7
        elif name.startswith(f"tiny_{problem[:-3]}"):
            tokens[1234] = 50300  # in the padded table, never a GPT-2 token
        write_shard(folder / name, tokens)
    config["data_config"].update(train_pattern=str(folder / "tiny_train_*.bin"),
                                 val_pattern=str(folder / "tiny_val_*.bin"))
    assert run.run(run.build_config(config), config_path="test") == 2
    out = capsys.readouterr().out
    expected = {"val_id": "tiny_val_000000.bin: 1 token ids are >= the vocabulary size 50257",
                "train_id": "tiny_train_000000.bin: 1 token ids are >= the vocabulary size",
                "no_bos": "no document start (BOS 50256)"}[problem]
    assert f"error: bad token shard {folder}" in out and expected in out
    assert "step 1/" not in out


def test_out_of_memory_names_the_next_micro_batch_that_fits(config, tmp_path, monkeypatch,
                                                            capsys):
    def out_of_memory(manager):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train.TrainingManager, "run", out_of_memory)
    # validation chunks of 128 tokens, behind 592 of context, need whole micro-batches of 128
    assert run.run(run.build_config(config), config_path="test") == 1
    assert "this is the smallest micro-batch" in capsys.readouterr().out
    config["training_config"]["val_chunk_tokens"] = 64
    assert run.run(run.build_config(config), config_path="test") == 1
    assert ("error: CUDA out of memory with micro-batches of 128 tokens; set "
            "BATCH_SIZE_MULTIPLE=1 (now 2): the tokens per optimizer step stay the same"
            in capsys.readouterr().out)


def test_early_stopped_run_writes_no_record(config, tmp_path):
    config["training_config"]["early_stop_steps"] = 3
    assert run.run(run.build_config(config), config_path="test") == 0
    assert not (tmp_path / "records").exists()


@pytest.mark.parametrize("config", ["config/cpu.py", "config/cpu92.py"])
def test_cli_cpu_smoke_run(data_dir, tmp_path, config):
    result = subprocess.run(
        [sys.executable, "run.py", "--config", config, "--early_stop_steps", "2",
         "--seed", "123", "--log_dir", str(tmp_path), "--val_tokens", "1024"],
        cwd=utils.REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "DATA_PATH": str(data_dir)})
    assert result.returncode == 0, result.stderr
    assert "step 2/" in result.stdout and "final val_loss" in result.stdout


def write_attempts(folder, losses, times=None, target=3.28):
    folder.mkdir(parents=True, exist_ok=True)
    for i, loss in enumerate(losses):
        time = 100.0 + i if times is None else times[i]
        (folder / f"{i}.json").write_text(json.dumps(
            {"val_loss": loss, "train_time": time, "target_val_loss": target,
             "run_id": f"run{i}", "seed": i, "steps": 10,
             "history": [[5, time / 2, loss + 1.0], [10, time, loss]]}))
    return folder


def test_summary_p_value_on_a_known_sample(tmp_path):
    # mean 3.27, sample std 0.01, n = 4: t = -2, df = 3; P(T_3 < -2) = 0.069663 (t table)
    losses = [3.27 - 0.01 * math.sqrt(1.5), 3.27 + 0.01 * math.sqrt(1.5), 3.27, 3.27]
    t, p = summary.one_sided_t_test(losses, 3.28)
    assert t == pytest.approx(-2.0)
    assert p == pytest.approx(0.069663, abs=1e-6)
    s = summary.summarize(summary.load_attempts([write_attempts(tmp_path / "a", losses)]))
    assert s["attempts"] == 4 and not s["accepted"] and s["p_value"] == pytest.approx(p)


def test_summary_accepts_a_record_below_the_target(tmp_path):
    # mean 3.258, std 0.008367, n = 5: t = -5.880, df = 4; the t table puts P(T_4 < -5.598)
    # at 0.0025 and P(T_4 < -7.173) at 0.001
    s = summary.summarize(summary.load_attempts(
        [write_attempts(tmp_path / "a", [3.25, 3.26, 3.27, 3.25, 3.26])]))
    assert s["t"] == pytest.approx(-5.880, abs=1e-3)
    assert 0.001 < s["p_value"] < 0.0025 and s["accepted"]


def test_summary_over_several_folders_and_one_attempt(tmp_path, capsys):
    write_attempts(tmp_path / "2026-12-01_base", [3.27, 3.29])
    write_attempts(tmp_path / "2026-12-02_base", [3.26], times=[90.0])
    assert summary.main([str(tmp_path / "*_base"), "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "3 attempts in 2 folders" in out and "nan" not in out
    assert out.count("2026-12-01_base") == 2 and out.count("2026-12-02_base") == 1
    mean = (3.27 + 3.29 + 3.26) / 3
    assert f"val loss   {mean:.4f} +- {statistics.stdev([3.27, 3.29, 3.26]):.4f}" in out
    assert summary.main([str(tmp_path / "2026-12-02_base")]) == 0
    out = capsys.readouterr().out
    assert "val loss   3.2600 (one attempt: no spread)" in out and "nan" not in out
    assert "p-value: needs at least two attempts" in out
    assert summary.main([str(tmp_path / "nothing_here")]) == 2


def test_packing_lookahead_reaches_the_loader(config, tmp_path):
    # data_config.packing_lookahead 0 packs in stream order (the records'): the first
    # micro-batch's segments are the stream's documents one after another
    config["data_config"]["packing_lookahead"] = 0
    manager = manager_for(config, tmp_path)
    served = np.concatenate([manager.train_loader.next_batch()[0].cpu().numpy()
                             for _ in range(4)])
    tokens = read_shard(sorted(glob.glob(config["data_config"]["train_pattern"]))[0])

    def first_batches(lookahead):
        finder = BOSFinder(tokens, config["training_config"]["max_seq_len"], lookahead)
        room = served.size // 4
        return np.concatenate([tokens[s:s + n] for _ in range(4)
                               for s, n in finder.next_segments(room)])

    assert np.array_equal(served, first_batches(0))
    assert not np.array_equal(first_batches(0), first_batches(64))  # the shards tell them apart
    config["data_config"]["packing_lookahead"] = -1
    with pytest.raises(utils.ConfigError, match="packing_lookahead must be >= 0"):
        run.build_config(config)


def test_device_gaps_are_the_union_of_kernel_intervals():
    """Busy time is the union of the device's intervals; the gaps are binned by length and
    the longest named with the kernel before it and the innermost host call covering it."""
    from benchmark import device_gaps

    events = [{"ph": "X", "cat": "kernel", "ts": 0, "dur": 10, "name": "first"},
              {"ph": "X", "cat": "kernel", "ts": 5, "dur": 10, "name": "overlapping"},
              {"ph": "X", "cat": "gpu_memcpy", "ts": 100, "dur": 10, "name": "copy"},
              {"ph": "X", "cat": "cpu_op", "ts": 20, "dur": 5000, "name": "step"},
              {"ph": "X", "cat": "cuda_runtime", "ts": 200, "dur": 1700, "name": "sync"},
              {"ph": "X", "cat": "kernel", "ts": 2000, "dur": 10, "name": "last"}]
    lines = device_gaps(events, longest=1)
    assert lines[0] == ("device busy 1.7% of the 2.0 ms from the first kernel to the last "
                        "(2.0 ms idle in 2 gaps: 0.0 ms under 10 us, 0.1 ms 10-100 us, "
                        "0.0 ms 100-1000 us, 1.9 ms over 1000 us)")
    assert lines[1:] == ["  gap 1.89 ms at 0.1 ms after copy; host: sync 1.70 ms; step 5.00 ms"]
    assert device_gaps(events[3:5]) == []


def test_no_step_after_the_warmup_compiles(config, tmp_path):
    """Compiled (inductor on the CPU), the warm-up compiles every graph the run takes: the
    whole run after it, through the stages, the untie, the sampled softmax at two set sizes and
    then the full softmax, the n-gram rows and the tables' Adam at pace 2, and validation,
    compiles nothing (the optimizer's compiled updates run on the GPU only:
    tests/test_gpu.py)."""
    config["compile_config"]["enabled"] = True
    config["model_config"]["ngram_table"] = True
    config["training_config"]["ngram_row_grads"] = True
    config["schedule"].update(adam_every=2, table_adam_every=4, table_adam_from=4,
                              sampled_softmax=((0, 128), (4, 256), (10, 0)),
                              sampled_softmax_rows=64)
    manager = manager_for(config, tmp_path)
    manager.warmup()
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses_of(manager, manager.schedule.total)
        assert math.isfinite(manager.validate())


def test_benchmark_mode_reports_every_stage(config, tmp_path):
    import benchmark

    config["training_config"]["benchmark_steps"] = 2
    manager = manager_for(config, tmp_path)
    assert benchmark.run_benchmark(manager, profile=True) == 0
    (written,) = tmp_path.glob("*_benchmark.json")
    result = json.loads(written.read_text())
    assert [r["steps"] for r in result["stages"]] == ["0-3", "4-7", "8-11", "12-13"]
    assert manager.step == 0  # the benchmark times the stages without moving the run
    assert [r["tokens_per_step"] for r in result["stages"]] == [128, 256, 256, 256]
    for row in result["stages"]:
        assert row["ms_per_step"] > 0 and 0 < row["optimizer_share"] < 1
        assert math.isfinite(row["loss"]) and row["loss"] > 0  # the timed steps' mean
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["ms_per_step"]
                                                    * 1000)
    assert result["projected_train_time_s"] == pytest.approx(
        sum(r["num_steps"] * r["ms_per_step"] for r in result["stages"]) / 1000)
    assert [r["num_steps"] for r in result["stages"]] == [4, 4, 4, 2]
    log = (tmp_path / "log.txt").read_text()
    assert "ms/step" in log and "Self CPU" in log and "projected train time" in log
    (trace,) = tmp_path.glob("*_trace.json.gz")
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("cat") == "cpu_op" for e in events)


def test_benchmark_fails_where_a_loss_is_not_finite(config, tmp_path, monkeypatch):
    """Steps that diverge time like any others: the benchmark says so and exits with 1."""
    import benchmark

    config["training_config"]["benchmark_steps"] = 2
    manager = manager_for(config, tmp_path)
    accumulate = manager.accumulate
    monkeypatch.setattr(manager, "accumulate", lambda plan: accumulate(plan) * (
        math.nan if plan.stage == 1 else 1.0))
    assert benchmark.run_benchmark(manager) == 1
    log = (tmp_path / "log.txt").read_text()
    assert "projected train time" in log
    assert "error: the loss is nan in stage 2 (steps 4-7): these timings are of steps" in log
    assert log.count("error: the loss") == 1


def test_benchmark_times_each_candidate_count_of_a_stage_apart(config):
    """A stage inside which the sampled softmax changes its candidate count is timed in parts,
    one a count (their step costs differ); switches at a stage's start cut nothing."""
    import benchmark

    config["schedule"].update(sampled_softmax=((0, 128), (4, 256), (10, 0)),
                              sampled_softmax_rows=64)
    schedule = run.build_config(config).schedule
    assert benchmark.timed_spans(schedule) == [(1, 0, 4), (2, 4, 8), (3, 8, 10), (3, 10, 12),
                                               (4, 12, 14)]
    assert [schedule.at(step).candidates for step in (8, 10)] == [256, 0]


def test_benchmark_times_the_ngram_rows_stage_by_stage(config, tmp_path, monkeypatch):
    """With the n-gram table's gradient as rows, stages that start where the tables' period
    leaves rows held: each stage is timed from no held gradient (the rows of two stages would
    overflow the buffer, sized for one run of the tables' period), over whole periods; the
    profile runs the stage that trains the most tokens (steps 8-11: 4 x 256)."""
    import benchmark

    planned = []
    stage_plan = benchmark.stage_plan
    monkeypatch.setattr(benchmark, "stage_plan",
                        lambda manager, first: planned.append(first) or stage_plan(manager, first))

    config["model_config"]["ngram_table"] = True
    config["training_config"].update(ngram_row_grads=True, benchmark_steps=2)
    config["schedule"].update(adam_every=2, table_adam_every=4, table_adam_from=0)
    stages = config["schedule"]["stages"]
    config["schedule"]["stages"] = (dict(stages[0], duration=5 / 12),
                                    dict(stages[1], duration=3 / 12), stages[2], stages[3])
    manager = manager_for(config, tmp_path)
    assert benchmark.run_benchmark(manager, profile=True) == 0
    result = json.loads(next(tmp_path.glob("*_benchmark.json")).read_text())
    assert [r["steps"] for r in result["stages"]] == ["0-4", "5-7", "8-11", "12-13"]
    assert result["timed_steps_per_stage"] == 4
    assert planned == [0, 5, 8, 12, 8]


def test_git_commit_marks_a_modified_checkout(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    clean = git_commit(tmp_path)
    assert len(clean) == 40
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "-dirty"
