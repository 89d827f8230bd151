"""Config loading, command-line and environment overrides, and their errors (run.py)."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import run
from utils import REPO_ROOT, ConfigError

CONFIG_TEXT = """
model_config = dict(num_layers=4, model_dim=64, activation="relu2", softcap=23.0,
                    window_pattern=(1, 2), fp8_mlp=True)
optimizer_config = dict(adam=dict(lr=0.008, betas=(0.9, 0.95)), normuon=dict(lr=0.05))
training_config = dict(seed=0, early_stop_steps=None, device="cuda", lr=1.0)
data_config = dict(train_pattern="a/*train_*.bin", val_pattern="a/*val_*.bin")
logging_config = dict(lr=2.0)
"""


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "conf.py"
    path.write_text(CONFIG_TEXT)
    return path


def test_load_returns_public_dicts(config_path):
    config = run.load_config(config_path)
    assert set(config) == {"model_config", "optimizer_config", "training_config", "data_config",
                           "logging_config"}
    assert config["model_config"]["num_layers"] == 4


def test_config_can_build_on_another(tmp_path, config_path):
    # A config that imports another and changes a few keys must leave the original untouched.
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""
        import importlib.util
        _spec = importlib.util.spec_from_file_location("parent_conf", {str(config_path)!r})
        _parent = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_parent)
        model_config = dict(_parent.model_config, num_layers=2)
        training_config = _parent.training_config
    """))
    config = run.load_config(child)
    assert config["model_config"]["num_layers"] == 2
    assert config["model_config"]["model_dim"] == 64
    assert run.load_config(config_path)["model_config"]["num_layers"] == 4


def test_repo_configs_build_on_base():
    base = run.load_config(REPO_ROOT / "config" / "base.py")
    small = run.load_config(REPO_ROOT / "config" / "small.py")
    assert set(small) == set(base)
    assert small["model_config"] != base["model_config"]


def test_missing_config_file_lists_available(tmp_path):
    with pytest.raises(ConfigError, match="config file not found.*config/base.py"):
        run.load_config(tmp_path / "nope.py")


def test_broken_config_is_named(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("model_config = dict(\n")
    with pytest.raises(ConfigError, match="bad.py failed to load: SyntaxError"):
        run.load_config(bad)


@pytest.mark.parametrize("key,text,path,value", [
    ("seed", "123", "training_config.seed", 123),
    ("early_stop_steps", "10", "training_config.early_stop_steps", 10),
    ("num_layers", "8", "model_config.num_layers", 8),
    ("model_config.model_dim", "128", "model_config.model_dim", 128),
    ("optimizer_config.adam.lr", "0.01", "optimizer_config.adam.lr", 0.01),
    ("optimizer_config.adam.betas", "(0.8,0.9)", "optimizer_config.adam.betas", (0.8, 0.9)),
    ("activation", "gelu", "model_config.activation", "gelu"),
    ("softcap", "30", "model_config.softcap", 30.0),
    ("window_pattern", "[3,4]", "model_config.window_pattern", (3, 4)),
    ("fp8_mlp", "false", "model_config.fp8_mlp", False),
    ("fp8_mlp", "TRUE", "model_config.fp8_mlp", True),
    ("fp8_mlp", "False", "model_config.fp8_mlp", False),
])
def test_override_paths(config_path, key, text, path, value):
    config = run.load_config(config_path)
    assert run.apply_override(config, key, text) == path
    node = config
    for part in path.split("."):
        node = node[part]
    assert node == value and type(node) is type(value)


def test_override_of_none_is_typed_by_the_field():
    # None gives no type to keep: the field's annotation (int | None) does, in build_config
    config = run.load_config(REPO_ROOT / "config" / "cpu.py")
    run.apply_override(config, "early_stop_steps", "5")
    assert run.build_config(config).training.early_stop_steps == 5
    config = run.load_config(REPO_ROOT / "config" / "cpu.py")
    run.apply_override(config, "early_stop_steps", "abc")
    with pytest.raises(ConfigError, match="'training_config.early_stop_steps' expects int or "
                                          "None, got str 'abc'"):
        run.build_config(config)


@pytest.mark.parametrize("key,text,message", [
    ("num_layer", "3", r"unknown config key 'num_layer'; did you mean: num_layers"),
    ("model_config.num_layer", "3", r"did you mean: model_config.num_layers"),
    ("lr", "3", r"ambiguous config key 'lr': it exists in 4 places; use one of: "
                r"logging_config.lr, optimizer_config.adam.lr, optimizer_config.normuon.lr, "
                r"training_config.lr$"),
    ("adam.lr", "0.5", None),
    ("normuon.lr", "x", r"'optimizer_config.normuon.lr' expects float"),
    ("num_layers", "4.5", r"'model_config.num_layers' expects int.*got float"),
    ("num_layers", "many", r"expects int.*got str"),
    ("seed", "True", r"expects int.*got bool"),
    ("adam", "1", r"is a whole dict"),
])
def test_override_errors(config_path, key, text, message):
    config = run.load_config(config_path)
    if message is None:  # a path's unique tail resolves
        assert run.apply_override(config, key, text) == "optimizer_config.adam.lr"
        return
    with pytest.raises(ConfigError, match=message):
        run.apply_override(config, key, text)


@pytest.mark.parametrize("args,message", [
    (["--batch_size_multiple", "0"], "training_config: batch_size_multiple must be > 0, got 0"),
    (["--max_seq_len", "0"], "training_config: max_seq_len must be > 0, got 0"),
    (["--max_seq_len", "-64"], "max_seq_len must be > 0, got -64"),
    (["--checkpoint_every", "-1"], "checkpoint_every must be >= 0, got -1"),
    (["--early_stop_steps", "abc"], "'training_config.early_stop_steps' expects int or None"),
    (["--early_stop_steps", "0"], "early_stop_steps must be > 0, got 0"),
    (["--seed", "-3"], "seed must be >= 0, got -3"),
    (["--val_loss_every", "-5"], "val_loss_every must be >= 0"),
    (["--lr", "0.1"], "ambiguous config key 'lr': it exists in 6 places; use one of: "
                      "optimizer_config.adam.lr, optimizer_config.anvil.lr, "
                      "optimizer_config.aro.lr, "
                      "optimizer_config.bam.lr, optimizer_config.normuon.lr, "
                      "optimizer_config.scalar_adam.lr"),
    (["--adam.lr", "-0.1"], "optimizer_config.adam: lr must be >= 0, got -0.1"),
    (["--normuon.beta2", "1.5"], "optimizer_config.normuon: beta2 must be in \\[0, 1\\)"),
    (["--anvil.fast_weight", "1.5"], "optimizer_config.anvil: fast_weight must be in \\[0, 1\\]"),
    (["--scalar_adam.betas", "(0.9, 2)"], "scalar_adam.betas must be two numbers in \\[0, 1\\)"),
    (["--num_scheduled_iterations", "0"], "schedule: num_scheduled_iterations must be > 0"),
    (["--cooldown_frac", "1.5"], "schedule: cooldown_frac must be in \\[0, 1\\]"),
    (["--num_layers", "0"], "model_config: num_layers must be > 0, got 0"),
    (["--num_train_shards", "0"], "data_config: num_train_shards must be > 0"),
    (["--run_name", "a/b"], "run_name 'a/b' names files"),
])
def test_cli_rejects_out_of_range_values_with_exit_2(args, message, capsys):
    assert run.main(["--config", "config/cpu.py", *args], environ={}) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_help_lists_the_common_keys():
    text = run.build_parser().format_help()
    for flag in ("--seed N", "--early_stop_steps N", "--checkpoint_every N"):
        assert flag in text
    args, config = run.resolve_config(["--config", "config/cpu.py", "--seed", "7",
                                       "--checkpoint_every", "3"], {})
    assert config["training_config"]["seed"] == 7
    assert config["training_config"]["checkpoint_every"] == 3


def test_parse_overrides_forms():
    assert run.parse_overrides(["--a", "1", "--b.c=2", "--d", "x y"]) == [
        ("a", "1"), ("b.c", "2"), ("d", "x y")]
    with pytest.raises(ConfigError, match="'--a' has no value"):
        run.parse_overrides(["--a", "--b", "1"])
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        run.parse_overrides(["stray"])


def test_environment_overrides(config_path):
    config = run.apply_environment(run.load_config(config_path),
                                   {"DATA_PATH": "/x/corpus", "BATCH_SIZE_MULTIPLE": "4"})
    assert config["data_config"]["train_pattern"] == str(Path("/x/corpus/*train_*.bin"))
    assert config["data_config"]["val_pattern"] == str(Path("/x/corpus/*val_*.bin"))
    assert config["training_config"]["batch_size_multiple"] == 4
    for bad in ("0", "-2", "half"):
        with pytest.raises(ConfigError, match="BATCH_SIZE_MULTIPLE must be a positive integer"):
            run.apply_environment(run.load_config(config_path), {"BATCH_SIZE_MULTIPLE": bad})


def test_device_cpu_turns_compile_off(config_path):
    _, config = run.resolve_config(["--config", str(config_path), "--device", "cpu"], {})
    assert config["training_config"]["device"] == "cpu"
    assert config["compile_config"]["enabled"] is False


def test_missing_resume_file(config_path, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint file"):
        run.resolve_config(["--config", str(config_path), "--resume", str(tmp_path / "c.pt")], {})


def _run_cli(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "run.py"), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_bad_key_exits_2_with_suggestion():
    result = _run_cli("--config", "config/cpu.py", "--num_layerz", "3")
    assert result.returncode == 2
    assert "unknown config key 'num_layerz'" in result.stderr
    assert "num_layers" in result.stderr


def test_cli_bad_type_exits_2():
    result = _run_cli("--config", "config/cpu.py", "--seed", "1.5")
    assert result.returncode == 2
    assert "expects int" in result.stderr


def test_cli_missing_data_is_named(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), "--config", "config/cpu.py",
         "--early_stop_steps", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "DATA_PATH": str(tmp_path)})
    assert result.returncode == 2
    assert "no shard files match" in result.stderr and str(tmp_path) in result.stderr


def test_cli_bad_optimizer_config_exits_2():
    result = _run_cli("--config", "config/cpu.py", "--matrix_optimizer", "adamw")
    assert result.returncode == 2
    assert "matrix_optimizer must be one of" in result.stderr
