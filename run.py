"""Command line entry point: load a config module, apply overrides, set up the device, train.

    uv run run.py --config config/base.py [--seed 123] [--early_stop_steps 10] [--key value ...]
    torchrun --standalone --nproc_per_node=N run.py --config config/base.py   # N GPUs

A config is a flat Python module whose public dict attributes (``model_config``,
``optimizer_config``, ``training_config``, ...) are the sections of the run's configuration.
Any key can be overridden from the command line as ``--key value`` (when the key name is unique
across sections) or ``--section.key value`` / ``--section.sub.key value`` (always unambiguous).
Values are parsed as Python literals and must keep the type of the value they replace.
Everything here is checked before torch is imported, so a bad command fails in a blink.
Under torchrun every process checks the same and exits with the same status; rank 0 says why.
"""

import argparse
import ast
import copy
import difflib
import importlib.util
import os
import sys
from pathlib import Path

from utils import REPO_ROOT, ConfigError

EXIT_USAGE = 2


# ----------------------------------------------------------------------------------------------
# Loading a config module


def load_config(path):
    """Import the config module at ``path`` and return its public dict attributes, deep-copied.

    Copies keep a config that imports another one (``from config import base``) from changing
    the imported module's dicts for the rest of the process.
    """
    path = Path(path)
    if not path.is_file():
        available = sorted(f"config/{p.name}" for p in (REPO_ROOT / "config").glob("*.py")
                           if p.name != "__init__.py")
        raise ConfigError(f"config file not found: {path} (available: {', '.join(available)})")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # lets a config import another: from config import base
    spec = importlib.util.spec_from_file_location(f"_run_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"config {path} failed to load: {type(exc).__name__}: {exc}") from exc
    config = {name: copy.deepcopy(value) for name, value in vars(module).items()
              if not name.startswith("_") and isinstance(value, dict)}
    if not config:
        raise ConfigError(f"config {path} defines no dicts (expected model_config, "
                          "training_config, ...)")
    return config


# ----------------------------------------------------------------------------------------------
# Overrides


def _dotted_keys(tree, prefix=""):
    """Every addressable key path in a nested dict: 'section.key', 'section.sub.key', ..."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, dict):
            yield from _dotted_keys(value, prefix=path + ".")


def _resolve_key(config, key):
    """Map an override key to a full dotted path, or raise a ConfigError with suggestions."""
    paths = list(_dotted_keys(config))
    if "." in key:
        if key in paths:
            return key
        close = difflib.get_close_matches(key, paths, n=5, cutoff=0.5)
        raise ConfigError(f"unknown config key '{key}'" + _suggest(close))
    matches = [p for p in paths if p.split(".")[-1] == key and p.count(".") == 1]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"ambiguous config key '{key}': it exists in several sections; "
                          f"use one of: {', '.join(sorted(matches))}")
    leaves = sorted({p.split(".")[-1] for p in paths if p.count(".") == 1})
    close = difflib.get_close_matches(key, leaves, n=5, cutoff=0.5)
    close += difflib.get_close_matches(key, paths, n=3, cutoff=0.6)
    raise ConfigError(f"unknown config key '{key}'" + _suggest(close))


def _suggest(candidates):
    candidates = list(dict.fromkeys(candidates))
    return f"; did you mean: {', '.join(candidates)}?" if candidates else ""


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as relu2 or a path is taken as a string


def _check_type(path, old, new):
    """New values keep the type of the value they replace (ints widen to floats)."""
    if old is None or new is None:
        return new
    if isinstance(old, bool) or isinstance(new, bool):
        if isinstance(old, bool) and isinstance(new, bool):
            return new
    elif isinstance(old, float) and isinstance(new, int):
        return float(new)
    elif isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return type(old)(new)
    elif isinstance(new, type(old)):
        return new
    raise ConfigError(f"config key '{path}' expects {type(old).__name__} (current value "
                      f"{old!r}), got {type(new).__name__} {new!r}")


def apply_override(config, key, text):
    """Set one override given as text; returns the full dotted path that was changed."""
    path = _resolve_key(config, key)
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    if isinstance(node[leaf], dict):
        raise ConfigError(f"config key '{path}' is a whole dict; override one of its keys: "
                          + ", ".join(f"{path}.{k}" for k in node[leaf]))
    node[leaf] = _check_type(path, node[leaf], _parse_value(text))
    return path


def parse_overrides(tokens):
    """Split ['--a', '1', '--b.c=2'] into [('a', '1'), ('b.c', '2')]."""
    pairs, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument '{token}': overrides are written --key value")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 2
        else:
            raise ConfigError(f"override '--{key}' has no value")
        pairs.append((key, value))
    return pairs


def apply_environment(config, environ=os.environ):
    """DATA_PATH and BATCH_SIZE_MULTIPLE, documented in README, override the config."""
    data_path = environ.get("DATA_PATH")
    if data_path:
        data = config.setdefault("data_config", {})
        data["train_pattern"] = str(Path(data_path) / "*train_*.bin")
        data["val_pattern"] = str(Path(data_path) / "*val_*.bin")
    multiple = environ.get("BATCH_SIZE_MULTIPLE")
    if multiple:
        try:
            value = int(multiple)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(f"BATCH_SIZE_MULTIPLE must be a positive integer, got '{multiple}'")
        config.setdefault("training_config", {})["batch_size_multiple"] = value
    return config


# ----------------------------------------------------------------------------------------------
# Entry point


def build_parser():
    parser = argparse.ArgumentParser(
        description="GPT-2 speedrun trainer (one GPU, or several under torchrun). Any config "
                    "key can be overridden as --key value or --section.key value.",
        epilog="Examples: run.py --config config/base.py | run.py --config config/cpu.py "
               "--early_stop_steps 10 --seed 123 | run.py --config config/small.py "
               "--model_config.num_layers 8")
    parser.add_argument("--config", required=True, help="path to a config module (config/*.py)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="override the config's device; cpu turns compile off")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="continue from a checkpoint written by --checkpoint_every")
    parser.add_argument("--benchmark", action="store_true",
                        help="time each schedule stage and print a throughput table")
    parser.add_argument("--profile", action="store_true",
                        help="with --benchmark: also profile the last stage's kernels")
    return parser


def resolve_config(argv, environ=os.environ):
    """Parse the command line into (args, config); raises ConfigError on any bad input."""
    args, rest = build_parser().parse_known_args(argv)
    config = apply_environment(load_config(args.config), environ)
    for key, value in parse_overrides(rest):
        apply_override(config, key, value)
    if args.device is not None:
        config.setdefault("training_config", {})["device"] = args.device
        if args.device == "cpu":
            config.setdefault("compile_config", {})["enabled"] = False
    if args.resume is not None and not Path(args.resume).is_file():
        raise ConfigError(f"--resume: no checkpoint file at {args.resume}")
    return args, config


def main(argv=None, environ=os.environ):
    is_main = environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 reports errors
    try:
        args, config = resolve_config(sys.argv[1:] if argv is None else argv, environ)
        # heavy imports (torch) only once the command line is known to be good
        import train
        from distributed import World

        world = World.from_env(environ)
        train.validate_config(config, world.world_size)
    except ConfigError as exc:
        if is_main:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return train.run_training(config, resume=args.resume, benchmark=args.benchmark,
                              profile=args.profile, config_path=args.config, world=world)


if __name__ == "__main__":
    sys.exit(main())
