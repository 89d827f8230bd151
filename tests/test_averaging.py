"""averaging.py: record #92's ships (its TailEMA, tail average, value average and bank blend)
against the record's own code (tests/reference/record92), and in the trainer: the shipped
weights are the ones validated and saved, and the averages travel in checkpoints."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import manager_for, tiny_config, write_tiny_shards

import run
from averaging import TailShips, model_groups
from checkpoints import load_model
from utils import ConfigError

REFERENCE = Path(__file__).parent / "reference" / "record92"
# the reference's labels, in the order it draws them, and our groups
LABELS = {"lm_head": "lm_head", "embed": "embed", "value_embeds": "value_embeds",
          "qk_bank": "qk", "vo_bank": "vo", "mlp_bank": "mlp"}
SHIP_NAMES = {"tail-ema": "tail EMA", "tail-avg": "tail average", "value-embed": "value average",
              "bank-blend": "bank blend"}


@pytest.fixture
def config(tmp_path):
    return tiny_config(tmp_path, write_tiny_shards(tmp_path))


def settings(tail_ema_window=0, tail_average_window=0, bank_blend_window=0, blend=0.65):
    return SimpleNamespace(tail_ema_window=tail_ema_window, tail_ema_blend=blend,
                           tail_average_window=tail_average_window,
                           bank_blend_window=bank_blend_window, bank_blend=0.55,
                           bank_blend_correction=0.2007)


def replay(labels, total, ships_settings):
    """The reference's synthetic run: (6, 4) float32 weights from seed 0 in label order; Adam's
    (lm_head, embed, value embeddings) move on odd steps, ANVIL's banks every step, by seeded
    normal steps of 0.05 (seed 1000 + step, drawn in sorted label order)."""
    g = torch.Generator().manual_seed(0)
    params = {label: torch.randn(6, 4, generator=g, dtype=torch.float64).float()
              for label in labels}
    ships = TailShips({LABELS[label]: {label: t} for label, t in params.items()},
                      ships_settings, total)
    ticks = {ship.name: [] for ship in ships.ships}
    for step in range(total):
        g = torch.Generator().manual_seed(1000 + step)
        for label in sorted(params):
            if step % 2 == 1 or label.endswith("_bank"):
                params[label].add_(torch.randn(6, 4, generator=g, dtype=torch.float64).float()
                                   * 0.05)
        for ship in ships.ships:
            if ship.rate(step) is not None:
                ticks[ship.name].append([step, ship.rate(step)])
        ships.tick(step)
    return params, ticks, ships.ship()


@pytest.mark.parametrize("case", range(4))
def test_tail_ema_is_record_92s(case):
    reference = json.loads((REFERENCE / "tail_ema.json").read_text())["cases"][case]
    labels = ("lm_head", "embed")
    params, ticks, shipped = replay(labels, reference["train_steps"],
                                    settings(reference["window"], blend=reference["blend"]))
    assert shipped == ["tail EMA"]
    ticks = ticks["tail EMA"]
    assert len(ticks) == reference["ticks"]
    assert ticks[0] == reference["first_tick"] and ticks[-1] == reference["last_tick"]
    for name, param in params.items():
        torch.testing.assert_close(param, torch.tensor(reference["final"][name]), rtol=0,
                                   atol=0)


@pytest.mark.parametrize("case", range(2))
def test_all_four_ships_are_record_92s(case):
    """A short run with the windows scaled down (62 steps, windows 14) and record #92's own
    (1194 steps, windows 298 / 250 / 298): every ship's ticks, and every weight after the
    ships and the renormalisation equal to the last bit."""
    reference = json.loads((REFERENCE / "ships.json").read_text())["cases"][case]
    params, ticks, shipped = replay(tuple(LABELS), reference["train_steps"],
                                    settings(**reference["windows"]))
    assert shipped == ["tail EMA", "tail average", "value average", "bank blend"]
    for key, expected in reference["ships"].items():
        got = ticks[SHIP_NAMES[key]]
        assert [len(got), got[0], got[-1]] == [expected["ticks"], expected["first_tick"],
                                                expected["last_tick"]], key
    for label, param in params.items():
        torch.testing.assert_close(param, torch.tensor(reference["final"][label]), rtol=0,
                                   atol=0, msg=label)


WINDOWS = dict(tail_ema_window=6, tail_average_window=7, bank_blend_window=10)


def tail_config(config):
    config["schedule"].update(adam_every=2, **WINDOWS)
    return config


def parameters(manager):
    """Every tensor the ships average, by name."""
    return {name: t.detach().clone() for group in model_groups(manager.model).values()
            for name, t in group.items()}


def test_the_run_validates_and_saves_the_shipped_weights(config, tmp_path):
    # the same run without the ships: its weights after each step are what the ships see
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
    groups = {group: {name: expected[name] for name in tensors}
              for group, tensors in model_groups(plain.model).items()}
    ships = TailShips(groups, settings(**WINDOWS), 14)
    for i, weights in enumerate(trajectory):
        for name, value in weights.items():
            expected[name].copy_(value)
        ships.tick(i)
    assert ships.ship() == ["tail EMA", "tail average", "value average", "bank blend"]

    manager = manager_for(tail_config(config), tmp_path)
    result = manager.run()
    got = parameters(manager)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
    for name in ("lm_head", "blocks.0.attn.qk", "blocks.0.attn.vo", "blocks.0.mlp.fc",
                 "value_embeds.tables.0"):
        assert not torch.equal(got[name], trajectory[-1][name]), name
    assert result["val_loss"] != plain_result["val_loss"]
    assert result["val_loss"] == pytest.approx(manager.validate(), rel=1e-6)
    saved, _ = load_model(result["model"])
    assert torch.equal(saved.lm_head, expected["lm_head"])
    assert torch.equal(saved.blocks[0].attn.qk, expected["blocks.0.attn.qk"])


def test_resume_inside_the_windows_equals_uninterrupted(config, tmp_path):
    tail_config(config)
    reference = manager_for(config, tmp_path)
    reference.run()
    first = manager_for(config, tmp_path)
    for _ in range(11):  # the windows are steps 4-13, 7-13, 8-13: the checkpoint holds averages
        first.train_step()
        first.tail_ships.tick(first.step - 1)
    assert all(ship.averages for ship in first.tail_ships.ships)
    path = first.save_checkpoint(tmp_path / "ckpt" / "mid.pt")
    resumed = manager_for(config, tmp_path)
    resumed.load_checkpoint(path)
    resumed.run()
    expected = parameters(reference)
    for name, value in parameters(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_tail_ema_state_of_a_checkpoint_from_before_the_other_ships_loads():
    ships = TailShips({"lm_head": {"lm_head": torch.zeros(2)}, "embed": {"embed": torch.zeros(2)}},
                      settings(tail_ema_window=4), 10)
    ships.load_state_dict({"lm_head": torch.ones(2), "embed": torch.ones(2)})
    assert set(ships.state_dict()) == {"tail EMA/lm_head", "tail EMA/embed"}
    with pytest.raises(ValueError, match="matches no ship"):
        ships.load_state_dict({"bank blend/blocks.0.attn.qk": torch.ones(2)})


@pytest.mark.parametrize("updates,message", [
    (dict(adam_every=1, tail_ema_window=6), "tail_ema_window needs adam_every=2"),
    (dict(bank_blend_window=20), "bank_blend_window=20 is longer than the run's 14"),
    (dict(tail_average_window=-2), "tail_average_window must be >= 0"),
    (dict(bank_blend_window=6, bank_blend=0.1), "bank_blend_correction \\(0.2007\\) must not "
                                                "exceed bank_blend \\(0.1\\)"),
    (dict(adam_every=2, tail_ema_window=15), "tail_ema_window=15 is longer than the run's 14"),
    (dict(adam_every=2, tail_ema_window=-1), "tail_ema_window must be >= 0"),
    (dict(adam_every=2, tail_ema_window=6, tail_ema_blend=1.5), "tail_ema_blend"),
])
def test_bad_tail_ema_settings_are_named(config, updates, message):
    config["schedule"].update(updates)
    with pytest.raises(ConfigError, match=message):
        run.build_config(config)


def test_configs_saved_before_the_averaging_keys_still_load(config):
    for key in ("tail_ema_window", "tail_ema_blend", "tail_average_window", "bank_blend_window",
                "bank_blend", "bank_blend_correction"):
        config["schedule"].pop(key, None)
    schedule = run.build_config(config).schedule.config
    assert schedule.tail_ema_window == schedule.tail_average_window == 0


def test_matrix_averages_refused_for_record55():
    config = run.load_config(Path(run.__file__).parent / "config" / "record55.py")
    config["schedule"]["bank_blend_window"] = 10
    with pytest.raises(ConfigError, match="bank_blend_window: record #55's model"):
        run.build_config(config)
