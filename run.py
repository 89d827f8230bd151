"""The process: command line, config, device, data, the mode (train or benchmark), exit codes.

    uv run run.py --config config/base.py [--seed 123] [--early_stop_steps 10] [--key value ...]
    uv run run.py --config config/base.py --benchmark      # time every stage of the schedule
    torchrun --standalone --nproc_per_node=N run.py --config config/base.py   # N GPUs

A config is a flat Python module whose public dict attributes (``model_config``,
``optimizer_config``, ``training_config``, ``schedule``, ...) are the sections of the run's
configuration. Any key can be overridden from the command line as ``--key value`` (when the
key name occurs once in the config) or ``--section.key value`` / ``--section.sub.key value``
(always unambiguous). Values are parsed as Python literals and must keep the type of the value
they replace. The command line is checked before torch is imported; then ``build_config``
turns the sections into their typed, checked objects once (``RunConfig``), before any model
is built, and the rest of the code receives those. Under torchrun every process checks the
same and exits with the same status; rank 0 says why.
"""

import argparse
import ast
import copy
import difflib
import importlib.util
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from utils import REPO_ROOT, ConfigError, repo_path

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
    """Map an override key to a full dotted path, or raise a ConfigError with suggestions.

    A key is a path's tail: 'seed', 'adam.lr' or 'optimizer_config.adam.lr'; it must name
    exactly one key of the config (sections themselves are not keys)."""
    paths = [p for p in _dotted_keys(config) if "." in p]
    matches = [p for p in paths if p == key or p.endswith("." + key)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"ambiguous config key '{key}': it exists in {len(matches)} places; "
                          f"use one of: {', '.join(sorted(matches))}")
    leaves = sorted({p.split(".")[-1] for p in paths})
    close = [] if "." in key else difflib.get_close_matches(key, leaves, n=5, cutoff=0.5)
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
    if isinstance(old, bool) and isinstance(new, str) and new.lower() in ("true", "false"):
        return new.lower() == "true"  # the spelling of JSON and of most CLIs
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
# The typed config


SECTIONS = ("model_config", "optimizer_config", "training_config", "schedule", "data_config",
            "logging_config", "compile_config")


@dataclass(frozen=True)
class RunConfig:
    """Every section of a config, typed and checked; ``raw`` is the resolved config as loaded
    (overrides applied), kept for the log, W&B, checkpoints and records."""

    model: object  # model.GPTConfig
    optimizer: object  # optimizers.OptimizerConfig
    training: object  # train.TrainingConfig
    schedule: object  # schedule.Schedule
    data: object  # data.loader.DataConfig
    logging: object  # train.LoggingConfig
    compile: object  # utils.CompileConfig
    raw: dict


def build_config(raw: dict, world_size: int = 1) -> RunConfig:
    """Check every section and the rules between them; ConfigError names the first problem."""
    from data.loader import DataConfig
    from model import model_config
    from optimizers import OptimizerConfig
    from schedule import Schedule, ScheduleConfig
    from train import LoggingConfig, TrainingConfig, validation_context, validation_fits
    from utils import CompileConfig, build_section

    unknown = sorted(set(raw) - set(SECTIONS))
    missing = [s for s in SECTIONS if s not in raw]
    if unknown or missing:
        raise ConfigError(f"config: unknown sections {unknown}, missing sections {missing}")
    model = model_config(raw["model_config"])
    training = build_section(TrainingConfig, "training_config", raw["training_config"])
    schedule = Schedule(ScheduleConfig.from_dict(raw["schedule"]), training.batch_size_multiple,
                        training.max_seq_len, world_size)
    if training.max_seq_len % model.block_size:
        raise ConfigError(f"training_config.max_seq_len ({training.max_seq_len}) must be a "
                          f"multiple of model_config.block_size ({model.block_size})")
    chunk = training.val_chunk_tokens
    if chunk <= 0 or training.val_tokens <= 0 or training.val_tokens % (chunk * world_size):
        processes = f" x {world_size} processes" if world_size > 1 else ""
        raise ConfigError(f"training_config.val_tokens ({training.val_tokens}) must be a "
                          f"positive multiple of val_chunk_tokens ({chunk}){processes}")
    context = validation_context(model, schedule)
    if not validation_fits(chunk, training.micro_batch_tokens, context):
        raise ConfigError(f"validation chunks of {chunk} tokens go to the model in micro-batches "
                          f"of {training.micro_batch_tokens}, each behind {context} tokens of "
                          "context (the model's reach at its largest windows): raise "
                          "BATCH_SIZE_MULTIPLE or lower val_chunk_tokens to the micro-batch")
    averages = [k for k in ("tail_average_window", "bank_blend_window")
                if getattr(schedule.config, k)]
    if averages and model.architecture == "record55":
        raise ConfigError(f"schedule.{averages[0]}: record #55's model has no Q/K, V/O and MLP "
                          "groups to average (averaging.py); set it to 0")
    if training.table_grads_in_place and model.architecture == "record55":
        raise ConfigError("training_config.table_grads_in_place: record #55's model looks its "
                          "tables up with autograd's own gradients; set it to false")
    if training.ngram_row_grads and not getattr(model, "ngram_table", False):
        raise ConfigError("training_config.ngram_row_grads keeps the n-gram table's gradient "
                          "as rows: it needs model_config.ngram_table; set it to false")
    if training.ngram_row_grads and (training.table_grads_in_place or training.grad_clip_norm):
        raise ConfigError("training_config.ngram_row_grads leaves the n-gram table without a "
                          "dense gradient, which table_grads_in_place and grad_clip_norm need: "
                          "turn those off (or ngram_row_grads)")
    if training.grad_clip_norm and world_size > 1:
        raise ConfigError("training_config.grad_clip_norm needs the whole gradient in one "
                          "place; with several processes each holds only its share of the "
                          "matrix gradients: set it to 0.0 (the speedrun's value) or use one")
    return RunConfig(model=model, optimizer=OptimizerConfig.from_dict(raw["optimizer_config"]),
                     training=training, schedule=schedule,
                     data=build_section(DataConfig, "data_config", raw["data_config"]),
                     logging=build_section(LoggingConfig, "logging_config",
                                           raw["logging_config"]),
                     compile=build_section(CompileConfig, "compile_config",
                                           raw["compile_config"]),
                     raw=raw)


# ----------------------------------------------------------------------------------------------
# Data


def ensure_data(data_config):
    """Download FineWeb on first use of the default path; any other empty path is an error."""
    from data.cached_fineweb10B import (
        DEFAULT_FINEWEB_DIR,
        DEFAULT_TRAIN_PATTERN,
        download_fineweb,
    )
    from data.loader import find_shards

    for key in ("train_pattern", "val_pattern"):
        try:
            find_shards(repo_path(getattr(data_config, key)))
        except FileNotFoundError as exc:
            if repo_path(data_config.train_pattern) == DEFAULT_TRAIN_PATTERN:
                print(f"no FineWeb shards in {DEFAULT_FINEWEB_DIR}: downloading "
                      f"{data_config.num_train_shards} train shards and the val shard")
                try:
                    download_fineweb(data_config.num_train_shards, DEFAULT_FINEWEB_DIR)
                except (ImportError, OSError, RuntimeError, ValueError) as download_error:
                    raise ConfigError(f"FineWeb download failed: {download_error}. Download "
                                      "by hand (python data/cached_fineweb10B.py 8) or set "
                                      "DATA_PATH") from download_error
                return
            raise ConfigError(f"data_config.{key}: {exc}. Set DATA_PATH to a folder holding "
                              "*train_*.bin and *val_*.bin shards") from exc


def prepare_data(data_config, world, device):
    """ensure_data on one process per node while the others wait; whether it went well on every
    node (a failure is printed where it happened)."""
    from data.shards import ShardError

    ok = True
    if world.local_rank == 0:
        try:
            ensure_data(data_config)
        except (ConfigError, ShardError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            ok = False
    return world.all_true(ok, world.torch_device(device.kind))


# ----------------------------------------------------------------------------------------------
# Running


def run(config: RunConfig, resume=None, benchmark=False, profile=False, config_path=None,
        world=None, choose_micro_batch=False, environ=os.environ):
    """Set up the device (and under torchrun the process group), train or benchmark, tear
    down; returns an exit status. ``choose_micro_batch``: on a GPU, the largest micro-batch
    that fits its memory replaces the config's (fit_micro_batch)."""
    import utils
    from distributed import World

    world = world or World()
    utils.setup_environment(config.compile.cache_dir)
    try:
        device = utils.detect_device(config.training.device, world.local_rank)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    world.init(device.kind)
    try:
        note = None
        if device.kind == "cuda":
            try:
                config, note = fit_micro_batch(config, device, world, environ,
                                               choose_micro_batch)
            except ConfigError as exc:
                if world.is_main:
                    print(f"error: {exc}", file=sys.stderr)
                return EXIT_USAGE
        if not prepare_data(config.data, world, device):
            return EXIT_USAGE
        utils.configure_torch(device, config.compile)
        return train_and_report(config, device, world, resume, benchmark, profile, config_path,
                                note)
    finally:
        world.shutdown()


def fit_micro_batch(config, device, world, environ, choose):
    """Apply MAX_GPU_MEMORY_GB, and with ``choose`` (BATCH_SIZE_MULTIPLE not set) put the
    largest micro-batch whose estimated peak fits the memory in the config's place (memory.py;
    the tokens per step stay). Returns the config and a line saying what was chosen."""
    import memory

    limit = memory.memory_limit(device, world.local_rank, environ)
    where = ("MAX_GPU_MEMORY_GB" if environ.get("MAX_GPU_MEMORY_GB") else "all") + \
        f" of {device.name}"
    tc = config.training
    if not choose:
        estimate = memory.peak_bytes(config, device, tc.batch_size_multiple)
        return config, (f"micro-batch {tc.micro_batch_tokens:,} tokens (BATCH_SIZE_MULTIPLE="
                        f"{tc.batch_size_multiple}, set by hand): estimated peak "
                        f"{estimate / memory.GB:.1f} GB of {limit / memory.GB:.1f} GB ({where})")
    multiple, estimate = memory.choose_multiple(config, device, limit, world.world_size)
    raw = copy.deepcopy(config.raw)
    raw["training_config"]["batch_size_multiple"] = multiple
    return build_config(raw, world.world_size), (
        f"micro-batch {multiple} x {tc.max_seq_len} = {multiple * tc.max_seq_len:,} tokens: the "
        f"largest up to the config's {tc.batch_size_multiple} x {tc.max_seq_len} whose estimated "
        f"peak, {estimate / memory.GB:.1f} GB, fits {limit / memory.GB:.1f} GB ({where}); "
        "BATCH_SIZE_MULTIPLE=N sets it by hand")


def train_and_report(config, device, world, resume, benchmark, profile, config_path,
                     note=None):
    """Build the manager and run it; failures become a logged message and an exit status."""
    import torch

    import checkpoints
    from data.shards import ShardError
    from records.write import write_record
    from train import RankLogger, RunLogger, TrainingError, TrainingManager

    tc = config.training
    state = None
    if resume:  # read first: a resumed run keeps its run id, so its log and record
        try:
            _, state = checkpoints.read(resume, world.torch_device(device.kind),
                                        kind="checkpoint")
        except checkpoints.CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    run_id = state["run_id"] if state else str(uuid.uuid4())
    run_id = world.broadcast_object(run_id, world.torch_device(device.kind))
    log_path = Path(repo_path(config.logging.log_dir)) / f"{run_id}.txt"
    if world.is_main:
        logger = RunLogger(log_path, config.logging, config.raw, config.schedule.total,
                           tc.run_name)
    else:
        logger = RankLogger(log_path, world.rank)
    devices = f"{world.world_size} x {device.name}" if world.distributed else device.name
    logger.print(f"run {run_id} | config {config_path} | device {devices} | log {log_path}")
    if note:
        logger.print(note)
    manager = None
    try:
        manager = TrainingManager(config, device, logger, world)
        manager.run_id = run_id
        if benchmark:
            import benchmark as bench

            return bench.run_benchmark(manager, profile=profile)
        if resume:
            manager.load_checkpoint(resume, state)
            del state  # the manager holds its own copies; free the checkpoint's GPU tensors
            logger.print(f"resumed from {resume} at step {manager.step}")
        if config.compile.enabled:
            seconds = manager.warmup()
            logger.print(f"compile and warm-up: {seconds:.1f}s (not counted; "
                         f"{manager.warmup_summary()})")
        result = manager.run()
        reached = result["val_loss"] <= tc.target_val_loss
        logger.print(f"final val_loss {result['val_loss']:.4f} | train_time "
                     f"{result['train_time']:.1f}s ({result['train_time'] / 60:.2f} min) | "
                     f"{result['steps']} steps | target {tc.target_val_loss} "
                     f"{'reached' if reached else 'not reached'}")
        if not result["early_stopped"] and world.is_main:
            record = write_record(config, result, log_path, device, run_id, world)
            logger.print(f"record attempt written: {record}")
        return 0
    except (ShardError, ConfigError, FileNotFoundError) as exc:
        logger.error(exc)
        return EXIT_USAGE
    except TrainingError as exc:
        logger.error(exc)
        return 1
    except torch.cuda.OutOfMemoryError:
        import memory

        smaller = memory.fitting_multiples(config, world.world_size)[1:2]
        advice = (f"set BATCH_SIZE_MULTIPLE={smaller[0]} (now {tc.batch_size_multiple}): the "
                  "tokens per optimizer step stay the same, only the micro-batch shrinks"
                  if smaller else "this is the smallest micro-batch: use a smaller model")
        logger.error(f"CUDA out of memory with micro-batches of {tc.micro_batch_tokens:,} "
                     f"tokens; {advice}")
        return 1
    except KeyboardInterrupt as exc:  # train.Interrupted carries the signal (SIGTERM: 143)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    finally:
        if manager is not None:
            manager.train_loader.close()
        logger.close()


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
                        help="continue from a checkpoint (written every --checkpoint_every "
                             "steps and on Ctrl-C or SIGTERM)")
    parser.add_argument("--benchmark", action="store_true",
                        help="time each schedule stage and print a throughput table")
    parser.add_argument("--profile", action="store_true",
                        help="with --benchmark: also profile the kernels of the stage that "
                             "trains the most tokens")
    keys = parser.add_argument_group(
        "config keys most often set (any other as --key value or --section.key value)")
    for key, text in COMMON_KEYS.items():
        keys.add_argument(f"--{key}", metavar="N", help=text)
    return parser


# training_config keys listed by --help; they are applied as overrides, checked alike
COMMON_KEYS = {
    "seed": "random seed of weights and data order (runs with one seed repeat exactly)",
    "early_stop_steps": "stop after N steps, every schedule unchanged (smoke runs)",
    "checkpoint_every": "write a checkpoint every N steps (0: only on interrupt)",
    "keep_checkpoints": "keep the newest N checkpoints of the run (0: all)",
}


def resolve_config(argv, environ=os.environ):
    """Parse the command line into (args, config dict); raises ConfigError on any bad input."""
    args, rest = build_parser().parse_known_args(argv)
    config = apply_environment(load_config(args.config), environ)
    common = [(f"training_config.{key}", getattr(args, key)) for key in COMMON_KEYS
              if getattr(args, key) is not None]
    overridden = {apply_override(config, key, value) for key, value in common
                  + parse_overrides(rest)}
    # set by hand, the micro-batch stays; otherwise a GPU run fits it to the memory
    args.micro_batch_set = (bool(environ.get("BATCH_SIZE_MULTIPLE"))
                            or "training_config.batch_size_multiple" in overridden)
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
        args, raw = resolve_config(sys.argv[1:] if argv is None else argv, environ)
        from distributed import World  # torch, once the command line is known to be good

        world = World.from_env(environ)
        config = build_config(raw, world.world_size)
    except ConfigError as exc:
        if is_main:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run(config, resume=args.resume, benchmark=args.benchmark, profile=args.profile,
               config_path=args.config, world=world,
               choose_micro_batch=not args.micro_batch_set, environ=environ)


if __name__ == "__main__":
    sys.exit(main())
