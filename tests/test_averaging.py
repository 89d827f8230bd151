"""averaging.py: record #92's TailEMA against the record's own code (tests/reference/record92),
and in the trainer: the averaged weights are the ones validated and saved, and the average
travels in checkpoints."""

import json
from pathlib import Path

import pytest
import torch
from test_train import manager_for, tiny_config, write_tiny_shards

import run
from averaging import TailEMA
from checkpoints import load_model
from utils import ConfigError

REFERENCE = Path(__file__).parent / "reference" / "record92" / "tail_ema.json"


@pytest.fixture
def config(tmp_path):
    return tiny_config(tmp_path, write_tiny_shards(tmp_path))


def trajectory_step(params, step):
    """The reference's synthetic optimizer: Adam's parameters move on odd steps only."""
    if step % 2 == 1:
        g = torch.Generator().manual_seed(1000 + step)
        for name in sorted(params):
            params[name].add_(torch.randn(params[name].shape, generator=g,
                                          dtype=torch.float64).float() * 0.05)


@pytest.mark.parametrize("case", range(4))
def test_tail_ema_is_record_92s(case):
    reference = json.loads(REFERENCE.read_text())["cases"][case]
    total = reference["train_steps"]
    g = torch.Generator().manual_seed(0)
    params = {name: torch.randn(6, 4, generator=g, dtype=torch.float64).float()
              for name in ("lm_head", "embed")}
    ema = TailEMA(params, reference["window"], reference["blend"], total)
    ticks = []
    for step in range(total):
        trajectory_step(params, step)
        if ema.rate(step) is not None:
            ticks.append([step, ema.rate(step)])
        ema.tick(step)
    assert ema.ship() == ["lm_head", "embed"]
    assert len(ticks) == reference["ticks"]
    assert ticks[0] == reference["first_tick"] and ticks[-1] == reference["last_tick"]
    for name, param in params.items():
        torch.testing.assert_close(param, torch.tensor(reference["final"][name]), rtol=0,
                                   atol=0)


def tail_config(config, window=6):
    config["schedule"].update(adam_every=2, tail_ema_window=window)
    return config


def parameters(manager):
    return {name: getattr(manager.model, name).detach().clone() for name in ("lm_head",
                                                                             "embed")}


def test_the_run_validates_and_saves_the_averaged_weights(config, tmp_path):
    # the same run without the average: its weights after each step are what the average sees
    plain = manager_for(dict(config, schedule=dict(config["schedule"], adam_every=2)),
                        tmp_path)
    trajectory, step = [], plain.train_step

    def recording():
        loss = step()
        trajectory.append(parameters(plain))
        return loss

    plain.train_step = recording
    plain_result = plain.run()
    expected = {name: value.clone() for name, value in trajectory[0].items()}
    ema = TailEMA(expected, 6, 0.65, 14)
    for i, weights in enumerate(trajectory):
        for name, value in weights.items():
            expected[name].copy_(value)
        ema.tick(i)
    ema.ship()

    manager = manager_for(tail_config(config), tmp_path)
    result = manager.run()
    for name, value in parameters(manager).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
        assert not torch.equal(value, trajectory[-1][name])
    assert result["val_loss"] != plain_result["val_loss"]
    assert result["val_loss"] == pytest.approx(manager.validate(), rel=1e-6)
    saved, _ = load_model(result["model"])
    assert torch.equal(saved.lm_head, expected["lm_head"])


def test_resume_inside_the_window_equals_uninterrupted(config, tmp_path):
    tail_config(config)
    reference = manager_for(config, tmp_path)
    reference.run()
    first = manager_for(config, tmp_path)
    for _ in range(11):  # the window is steps 8-13: the checkpoint holds an average
        first.train_step()
        if first.step > 8:
            first.tail_ema.tick(first.step - 1)
    assert first.tail_ema.averages
    path = first.save_checkpoint(tmp_path / "ckpt" / "mid.pt")
    resumed = manager_for(config, tmp_path)
    resumed.load_checkpoint(path)
    resumed.run()
    for name, value in parameters(resumed).items():
        torch.testing.assert_close(value, parameters(reference)[name], rtol=0, atol=0)


@pytest.mark.parametrize("updates,message", [
    (dict(adam_every=1, tail_ema_window=6), "tail_ema_window needs adam_every=2"),
    (dict(adam_every=2, tail_ema_window=15), "tail_ema_window=15 is longer than the run's 14"),
    (dict(adam_every=2, tail_ema_window=-1), "tail_ema_window must be >= 0"),
    (dict(adam_every=2, tail_ema_window=6, tail_ema_blend=1.5), "tail_ema_blend"),
])
def test_bad_tail_ema_settings_are_named(config, updates, message):
    config["schedule"].update(updates)
    with pytest.raises(ConfigError, match=message):
        run.build_config(config)


def test_configs_saved_before_the_tail_ema_keys_still_load(config):
    for key in ("tail_ema_window", "tail_ema_blend"):
        del config["schedule"][key]
    assert run.build_config(config).schedule.config.tail_ema_window == 0
