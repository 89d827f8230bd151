"""Training: the schedules, the TrainingManager loop, validation, checkpoints, logs and records.

``run.py`` hands the loaded config to ``run_training``. Everything the schedule does is a pure
function of the step (``Schedule``), so a resumed run recomputes the same windows, batch sizes,
learning rates and momenta as an uninterrupted one.

Under torchrun (``distributed.World``) each rank takes its own micro-batches of every step, so
the tokens per step, and the math, are those of one process; the optimizer averages the
gradients over the ranks. Rank 0 alone prints, logs, checkpoints and writes records.
"""

import json
import math
import os
import pickle
import platform
import random
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

import utils
from data.cached_fineweb10B import DEFAULT_FINEWEB_DIR, DEFAULT_TRAIN_PATTERN, download_fineweb
from data.loader import DataLoader, find_shards, val_batches
from data.shards import ShardError
from distributed import World
from model import GPT, GPTConfig, document_ids
from optimizers import build_optimizer, validate_optimizer_config
from utils import REPO_ROOT, ConfigError

SECTIONS = ("model_config", "optimizer_config", "training_config", "data_config",
            "batch_schedule", "window_schedule", "lr_schedule", "logging_config",
            "compile_config")
TRAINING_KEYS = ("device", "seed", "run_name", "num_scheduled_iterations",
                 "num_extension_iterations", "max_seq_len", "batch_size_multiple", "val_tokens",
                 "val_loss_every", "target_val_loss", "early_stop_steps", "grad_clip_norm",
                 "split_frac", "freeze_scalars_steps", "checkpoint_every", "checkpoint_dir",
                 "save_on_interrupt", "records_dir", "benchmark_steps")


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, out of memory); the message says why and where."""


# ----------------------------------------------------------------------------------------------
# Config checks: everything that can be known wrong before a model is built


def validate_config(config, world_size=1):
    """Raise ConfigError naming the first problems found; returns the Schedule."""
    missing = [s for s in SECTIONS if s not in config]
    if missing:
        raise ConfigError(f"config lacks the sections {missing}")
    tc = config["training_config"]
    absent = [k for k in TRAINING_KEYS if k not in tc]
    if absent:
        raise ConfigError(f"training_config lacks the keys {absent}")
    try:
        model_config = GPTConfig.from_dict(config["model_config"])
        validate_optimizer_config(config["optimizer_config"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if tc["max_seq_len"] % model_config.block_size:
        raise ConfigError(f"training_config.max_seq_len ({tc['max_seq_len']}) must be a "
                          f"multiple of model_config.block_size ({model_config.block_size})")
    if tc["device"] not in ("cuda", "cpu"):
        raise ConfigError(f"training_config.device must be 'cuda' or 'cpu', not {tc['device']!r}")
    schedule = Schedule(config, world_size)
    if tc["val_tokens"] <= 0 or tc["val_tokens"] % schedule.round_tokens:
        raise ConfigError(f"training_config.val_tokens ({tc['val_tokens']}) must be a positive "
                          f"multiple of {schedule.describe_round()}")
    if tc["grad_clip_norm"] and world_size > 1:
        raise ConfigError("training_config.grad_clip_norm needs the whole gradient in one "
                          "place; with several processes each holds only its share of the "
                          "matrix gradients: set it to 0.0 (the speedrun's value) or use one")
    return schedule


# ----------------------------------------------------------------------------------------------
# Schedules


class Schedule:
    """Batch size, windows, learning rate, momentum and untying as functions of the step.

    Steps 0 .. num_scheduled_iterations-1 follow the stages; the extension iterations after them
    run at the final learning rate with the extension window. The tokens of a step are those of
    the config whatever the world size: each of ``world_size`` processes accumulates its share.
    """

    def __init__(self, config, world_size=1):
        tc = config["training_config"]
        self.scheduled = tc["num_scheduled_iterations"]
        self.total = self.scheduled + tc["num_extension_iterations"]
        self.multiple, self.seq = tc["batch_size_multiple"], tc["max_seq_len"]
        self.micro_batch_tokens = self.multiple * self.seq
        self.world_size = world_size
        self.round_tokens = self.micro_batch_tokens * world_size  # one micro-batch per process
        bs, ws, lr = config["batch_schedule"], config["window_schedule"], config["lr_schedule"]
        self.batch_starts = self._starts("batch_schedule", bs["fractions"])
        self.batch_tokens = list(bs["tokens"])
        self.batch_lr_mul = list(bs["lr_mul"])
        self.window_starts = self._starts("window_schedule", ws["fractions"])
        self.long_windows = list(ws["long"])
        self.extension_long = ws["extension_long"]
        self.validation_long = ws["validation_long"]
        self.short_divisor = ws["short_divisor"]
        self.lr = lr
        self.untie_step = round(tc["split_frac"] * self.scheduled)
        self._check(bs, ws, lr)

    def _starts(self, name, fractions):
        starts = [round(f * self.scheduled) for f in fractions]
        if not starts or starts[0] != 0 or starts != sorted(set(starts)):
            raise ConfigError(f"{name}.fractions must start at 0 and increase: {fractions}")
        return starts

    def _check(self, bs, ws, lr):
        if self.scheduled < 1 or self.total < self.scheduled:
            raise ConfigError("num_scheduled_iterations must be >= 1 and extensions >= 0")
        if not len(self.batch_tokens) == len(self.batch_lr_mul) == len(self.batch_starts):
            raise ConfigError("batch_schedule: fractions, tokens and lr_mul need equal lengths")
        for tokens in self.batch_tokens:
            if tokens % self.round_tokens:
                raise ConfigError(f"batch_schedule.tokens {tokens} is not a multiple of "
                                  f"{self.describe_round()}; {self._batch_fix()}")
        if len(self.long_windows) != len(self.window_starts):
            raise ConfigError("window_schedule: fractions and long need equal lengths")
        windows = self.long_windows + [self.extension_long, self.validation_long]
        if any(not isinstance(w, int) or w < 1 for w in windows) or self.short_divisor < 1:
            raise ConfigError(f"window_schedule: windows must be positive ints: {windows}")
        if not 0 <= lr["cooldown_frac"] <= 1 or lr["warmup_steps"] < 0:
            raise ConfigError("lr_schedule: cooldown_frac in [0, 1], warmup_steps >= 0")

    def _batch_fix(self):
        """The largest smaller BATCH_SIZE_MULTIPLE that divides every stage, if any."""
        for multiple in range(self.multiple - 1, 0, -1):
            if not any(t % (multiple * self.seq * self.world_size) for t in self.batch_tokens):
                return f"lower BATCH_SIZE_MULTIPLE (e.g. BATCH_SIZE_MULTIPLE={multiple})"
        processes = " or the number of processes" if self.world_size > 1 else ""
        return f"no BATCH_SIZE_MULTIPLE fits: change the schedule{processes}"

    def describe_round(self):
        text = f"the micro-batch ({self.micro_batch_tokens} = batch_size_multiple x max_seq_len"
        if self.world_size > 1:
            text += f", x {self.world_size} processes = {self.round_tokens}"
        return text + " tokens)"

    @staticmethod
    def _stage(starts, step):
        return sum(1 for s in starts if s <= step) - 1

    def batch_stage(self, step):
        return self._stage(self.batch_starts, min(step, self.scheduled - 1))

    def tokens(self, step):
        return self.batch_tokens[self.batch_stage(step)]

    def accumulation_steps(self, step):
        """Micro-batches per process in the step."""
        return self.tokens(step) // self.round_tokens

    def windows(self, step):
        """(short, long) window in blocks; short = long // short_divisor."""
        if step >= self.scheduled:
            long = self.extension_long
        else:
            long = self.long_windows[self._stage(self.window_starts, step)]
        return max(1, long // self.short_divisor), long

    def validation_windows(self):
        return max(1, self.validation_long // self.short_divisor), self.validation_long

    def lr_factor(self, step):
        """Warm-up, flat, then linear cooldown to final_lr_ratio; times the stage's lr_mul."""
        lr = self.lr
        progress = min(step, self.scheduled) / self.scheduled
        if step < lr["warmup_steps"]:
            factor = (step + 1) / lr["warmup_steps"]
        elif progress < 1 - lr["cooldown_frac"]:
            factor = 1.0
        else:
            ramp = (progress - (1 - lr["cooldown_frac"])) / max(lr["cooldown_frac"], 1e-12)
            factor = 1.0 + min(ramp, 1.0) * (lr["final_lr_ratio"] - 1.0)
        return factor * self.batch_lr_mul[self.batch_stage(step)]

    def momentum(self, step):
        """Matrix-optimizer momentum: warm up, hold, cool down over the last steps."""
        lr = self.lr
        warm, cool = lr["momentum_warmup_steps"], lr["momentum_cooldown_steps"]
        if step < warm:
            return lr["momentum_start"] + (lr["momentum_peak"] - lr["momentum_start"]) * step / warm
        left = self.total - step
        if left < cool:
            return lr["momentum_end"] + (lr["momentum_peak"] - lr["momentum_end"]) * left / cool
        return lr["momentum_peak"]

    def is_transition(self, step):
        """A step whose batch size or window differs from the step before."""
        if step == 0:
            return False
        return (self.tokens(step) != self.tokens(step - 1)
                or self.windows(step) != self.windows(step - 1))

    def stages(self):
        """(first step, last step) of each distinct (batch size, window) stretch of the run."""
        bounds = [s for s in range(self.total) if s == 0 or self.is_transition(s)]
        return list(zip(bounds, bounds[1:] + [self.total], strict=True))


# ----------------------------------------------------------------------------------------------
# Logging


class RunLogger:
    """Prints to stdout (under a tqdm bar on a terminal), always to a text file, and to W&B
    when it is installed and enabled."""

    def __init__(self, path, logging_config, config, total_steps, run_name):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1)
        self.bar = None
        if logging_config["progress_bar"] and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, dynamic_ncols=True, leave=False)
        self.wandb = self._start_wandb(logging_config, config, run_name)

    def _start_wandb(self, logging_config, config, run_name):
        if not logging_config["wandb"] or os.environ.get("WANDB_MODE") == "disabled":
            return None
        try:
            import wandb
        except ImportError:
            self.print("wandb is not installed: logging to stdout and the log file only "
                       "(pip install wandb, or set logging_config.wandb False to hide this)")
            return None
        mode = os.environ.get("WANDB_MODE")
        if mode is None:
            mode = "online" if wandb.api.api_key else "offline"
        return wandb.init(project=logging_config["wandb_project"], name=run_name, config=config,
                          mode=mode, dir=str(self.path.parent))

    def print(self, message):
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)
        self.file.write(message + "\n")

    def step(self, step, message, metrics):
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_description_str(message, refresh=True)
        else:
            print(message, flush=True)
        self.file.write(message + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def error(self, message):
        self.print(f"error: {message}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file.close()


class RankLogger:
    """The logger of every rank but 0, which speaks for the run: it keeps quiet except for
    errors, printed to stderr with the rank, so that a failure on one rank is not lost."""

    wandb = None

    def __init__(self, path, rank):
        self.path = Path(path)  # rank 0's log
        self.rank = rank

    def print(self, message):
        pass

    def step(self, step, message, metrics):
        pass

    def error(self, message):
        print(f"rank {self.rank}: error: {message}", file=sys.stderr, flush=True)

    def close(self):
        pass


# ----------------------------------------------------------------------------------------------
# The training manager


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # RNG states are CPU byte tensors; a checkpoint read with map_location="cuda" moved them
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TrainingManager:
    """Owns the model, optimizers, data and schedule; ``run`` trains to the end or early stop.

    With several ranks (``world``), every rank builds one; they stay in step through the
    collectives of the optimizer, the loss and validation.
    """

    def __init__(self, config, device, logger=None, world=None):
        self.config = config
        self.tc = config["training_config"]
        self.device = device
        self.world = world or World()
        self.schedule = Schedule(config, self.world.world_size)
        self.logger = logger
        seed_everything(self.tc["seed"])
        torch_device = self.world.torch_device(device.kind)
        self.model = GPT(config["model_config"]).to(torch_device)
        # Every rank seeds alike; rank 0's weights make sure that they all start the same.
        self.world.broadcast_tensors([p.detach() for p in self.model.parameters()])
        self.optimizer = build_optimizer(self.model, config["optimizer_config"], self.world)
        compile_config = config["compile_config"]
        self.compiled = (torch.compile(self.model, dynamic=False, fullgraph=True)
                         if compile_config["enabled"] else self.model)
        dc, seq = config["data_config"], self.tc["max_seq_len"]
        micro = self.schedule.micro_batch_tokens
        ranks = dict(rank=self.world.rank, world_size=self.world.world_size)
        self.train_loader = DataLoader(repo_path(dc["train_pattern"]), micro, seq,
                                       device=torch_device, prefetch=dc["prefetch"], **ranks)
        self.val_batches = val_batches(repo_path(dc["val_pattern"]), self.tc["val_tokens"], micro,
                                       seq, device=torch_device, allow_fewer=True, **ranks)
        self.val_tokens = len(self.val_batches) * self.schedule.round_tokens
        if self.val_tokens < self.tc["val_tokens"] and logger is not None:
            logger.print(f"note: the val shards fill only {self.val_tokens:,} tokens of "
                         f"micro-batches, fewer than val_tokens={self.tc['val_tokens']:,}: "
                         "validating on those")
        self.windows = None  # (short, long) last set on the model
        self._flops = {}  # flops_per_token by windows, for MFU
        self.run_id = None  # kept in checkpoints: a resumed run appends to the same log
        self.step = 0  # optimizer steps completed
        self.train_time = 0.0  # seconds of training, validation and compile excluded
        self.history = []  # (step, train time, val loss)

    # -- schedule ---------------------------------------------------------------------------

    def apply_schedule(self, step):
        """Put the model and optimizer in the state the schedule asks for at ``step``."""
        windows = self.schedule.windows(step)
        if windows != self.windows:  # a Python mirror: reading the model's buffer would sync
            self.model.set_windows(*windows)
            self.windows = windows
        if step >= self.schedule.untie_step and self.model.tied:
            self.optimizer.copy_state(self.model.untie(), self.model.lm_head)
        if self.schedule.is_transition(step):
            self.optimizer.freeze_scalars(self.tc["freeze_scalars_steps"])
        self.optimizer.set_lr_factor(self.schedule.lr_factor(step))
        self.optimizer.set_momentum(self.schedule.momentum(step))

    # -- one step -----------------------------------------------------------------------------

    def train_step(self):
        """One optimizer step over the scheduled batch: gradient accumulation over fixed-size
        micro-batches, each loss divided by their number so the gradient is the mean over the
        whole batch whatever the split (the optimizer averages it over the ranks). Returns the
        mean loss over all ranks as a device tensor."""
        step = self.step
        self.apply_schedule(step)
        accumulation = self.schedule.accumulation_steps(step)
        total = torch.zeros((), device=self.model.lm_head.device)
        for _ in range(accumulation):
            inputs, targets = self.train_loader.next_batch()
            loss = self.compiled(inputs, targets, document_ids(inputs))
            (loss / accumulation).backward()
            total += loss.detach()
        self.model.fold_tied_grad()
        if self.tc["grad_clip_norm"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc["grad_clip_norm"])
        self.optimizer.step()
        self.model.sync_tied_weights()
        self.optimizer.zero_grad()
        self.step += 1
        return self.world.all_reduce_mean(total / accumulation)

    def validate(self):
        """The mean loss over the val batches; each rank has as many, its share of them.

        Compiled, it runs the training graph (grad mode on, no backward pass): a graph for
        no_grad would be a second compile, ~45 s of a cold start on the H100, for a pass that
        the train time does not count."""
        with torch.set_grad_enabled(self.compiled is not self.model):
            losses = [self.compiled(inputs, targets, document_ids(inputs)).detach()
                      for inputs, targets in self.val_batches]
        return self.world.all_reduce_mean(torch.stack(losses).mean()).item()

    # -- compile warm-up ------------------------------------------------------------------------

    def warmup(self):
        """Compile the graphs the run uses (the model's one training graph, which validation
        shares, and the optimizer's updates) with one step on real batches, then restore
        weights, optimizer, data position and RNG: the timed run starts from exactly the state
        it would have had without warm-up. Returns seconds spent."""
        start = time.perf_counter()
        model_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        optimizer_state = self.optimizer.state_dict()
        loader_state = self.train_loader.state_dict()
        rng = rng_state()
        step, windows = self.step, self.windows
        self.step = 0
        self.train_step()
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)
        self.train_loader.load_state_dict(loader_state)
        set_rng_state(rng)
        self.step, self.windows = step, windows
        synchronize(self.device)
        return time.perf_counter() - start

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint_state(self):
        return {"step": self.step, "run_id": self.run_id, "train_time": self.train_time,
                "history": self.history,
                "tied": self.model.tied, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "loader": self.train_loader.state_dict(), "rng": rng_state(),
                "config": self.config}

    def save_checkpoint(self, path):
        """Write atomically: a crash mid-write leaves the previous checkpoint intact.

        Every rank calls it (the optimizer state is gathered from all); rank 0 writes the one
        file. The loader's state is a position in the stream all ranks share, so rank 0's
        resumes every rank, on any world size.
        """
        path = Path(path)
        state = self.checkpoint_state()
        if self.world.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)
        return path

    def load_checkpoint(self, path, state=None):
        """Resume from the checkpoint at ``path`` (``state``: its contents, if already read)."""
        if state is None:
            state = read_checkpoint(path, self.model.lm_head.device)
        if state["config"]["model_config"] != self.config["model_config"]:
            raise ConfigError(f"checkpoint {path} was written for a different model_config")
        if "embed" not in state["model"]:
            raise ConfigError(f"checkpoint {path} comes from a version of the trainer that "
                              "stored a tied embedding once; resume it with that version (git "
                              "log) or start the run again")
        if not state["tied"]:
            self.model.untie()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step, self.train_time = state["step"], state["train_time"]
        self.run_id = state.get("run_id", self.run_id)
        self.windows = tuple(self.model.windows.tolist())
        self.history = state["history"]

    def checkpoint_path(self):
        name = f"{self.tc['run_name']}_step{self.step:06d}.pt"
        return Path(repo_path(self.tc["checkpoint_dir"])) / name

    # -- the loop -----------------------------------------------------------------------------

    def run(self):
        """Train until the schedule ends or early_stop_steps; returns the result dict."""
        log = self.logger.print
        stop = self.schedule.total
        if self.tc["early_stop_steps"] is not None:
            stop = min(stop, self.tc["early_stop_steps"])
        every = self.tc["val_loss_every"]
        synchronize(self.device)
        started = time.perf_counter()
        try:
            while self.step < stop:
                step_start = time.perf_counter()
                loss = self.train_step().item()
                synchronize(self.device)
                step_time = time.perf_counter() - step_start
                self.train_time += step_time
                if not math.isfinite(loss):
                    raise TrainingError(f"loss is {loss} at step {self.step}: training stopped "
                                        f"(log kept at {self.logger.path})")
                self.log_step(loss, step_time)
                if self.tc["checkpoint_every"] and self.step % self.tc["checkpoint_every"] == 0:
                    log(f"checkpoint written: {self.save_checkpoint(self.checkpoint_path())}")
                if every and self.step % every == 0 and self.step < stop:
                    self.log_validation(self.validate())
        except KeyboardInterrupt:
            if self.world.distributed:
                # Ranks are interrupted at different points: a collective now could hang.
                log(f"interrupted after step {self.step}; with several processes no checkpoint "
                    "is written on interrupt (use --checkpoint_every)")
            elif self.tc["save_on_interrupt"]:
                path = self.save_checkpoint(self.checkpoint_path())
                log(f"interrupted after step {self.step}; checkpoint saved to {path}; "
                    f"continue with --resume {path}")
            else:
                log(f"interrupted after step {self.step} (save_on_interrupt is off)")
            raise
        self.windows = self.schedule.validation_windows()
        self.model.set_windows(*self.windows, yarn=False)
        val_loss = self.validate()
        self.log_validation(val_loss)
        wall = time.perf_counter() - started
        return {"val_loss": val_loss, "train_time": self.train_time, "steps": self.step,
                "tokens": sum(self.schedule.tokens(s) for s in range(self.step)),
                "wall_time": wall, "early_stopped": self.step < self.schedule.total}

    def log_step(self, loss, step_time):
        step = self.step - 1
        tokens = self.schedule.tokens(step)
        message = (f"step {self.step}/{self.schedule.total} loss {loss:.4f} "
                   f"lr {self.schedule.lr_factor(step):.3f} tok/s {tokens / step_time:,.0f} "
                   f"step {step_time * 1000:.0f}ms time {self.train_time:.1f}s")
        metrics = {"train/loss": loss, "train/lr_factor": self.schedule.lr_factor(step),
                   "train/tokens_per_s": tokens / step_time, "train/step_ms": step_time * 1000}
        peak = self.device.peak_tflops
        if peak:
            if self.windows not in self._flops:
                self._flops[self.windows] = self.model.flops_per_token(
                    self.schedule.micro_batch_tokens, self.windows)
            flops = self._flops[self.windows] * tokens
            mfu = flops / step_time / (peak * 1e12 * self.world.world_size)  # per GPU
            message += f" mfu {mfu:.1%}"
            metrics["train/mfu"] = mfu
        self.logger.step(self.step, message, metrics)

    def log_validation(self, val_loss):
        self.history.append((self.step, self.train_time, val_loss))
        self.logger.print(f"step {self.step}/{self.schedule.total} val_loss {val_loss:.4f} "
                          f"train_time {self.train_time:.1f}s")
        if self.logger.wandb is not None:
            self.logger.wandb.log({"val/loss": val_loss, "train_time": self.train_time},
                                  step=self.step)


def read_checkpoint(path, device):
    return torch.load(path, map_location=device, weights_only=False)


def synchronize(device):
    if device.kind == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Data preparation, records and the entry point


def repo_path(path):
    """Relative paths in a config are relative to the repository root."""
    path = Path(path).expanduser()
    return str(path if path.is_absolute() else REPO_ROOT / path)


def ensure_data(dc):
    """Download FineWeb on first use of the default path; any other empty path is an error."""
    for key in ("train_pattern", "val_pattern"):
        try:
            find_shards(repo_path(dc[key]))
        except FileNotFoundError as exc:
            if repo_path(dc["train_pattern"]) == DEFAULT_TRAIN_PATTERN:
                print(f"no FineWeb shards in {DEFAULT_FINEWEB_DIR}: downloading "
                      f"{dc['num_train_shards']} train shards and the val shard")
                try:
                    download_fineweb(dc["num_train_shards"], DEFAULT_FINEWEB_DIR)
                except (ImportError, OSError, RuntimeError, ValueError) as download_error:
                    raise ConfigError(f"FineWeb download failed: {download_error}. Download "
                                      "by hand (python data/cached_fineweb10B.py 8) or set "
                                      "DATA_PATH") from download_error
                return
            raise ConfigError(f"data_config.{key}: {exc}. Set DATA_PATH to a folder holding "
                              "*train_*.bin and *val_*.bin shards") from exc


def git_commit():
    """HEAD's hash, with "-dirty" when tracked files differ from it (the record's .txt then
    holds the sources that actually ran); None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if head and dirty else head or None


def environment_report(device, world):
    lines = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"world size {world.world_size} ({world.world_size} x {device.name})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    lines.append(f"cuda {torch.version.cuda}")
    lines.append(f"device {device.name}")
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
        lines.append(smi.stdout)
    except (OSError, subprocess.SubprocessError):
        lines.append("nvidia-smi not available")
    return "\n".join(lines)


def write_record(config, result, log_path, device, run_id, world):
    """records/<date>_<run_name>/<uuid>.txt (code, config, environment, log) and .json."""
    date = datetime.now().strftime("%Y-%m-%d")
    tc = config["training_config"]
    folder = Path(repo_path(tc["records_dir"])) / f"{date}_{tc['run_name']}"
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(p for p in REPO_ROOT.rglob("*.py")
                     if not any(part.startswith(".") for part in p.relative_to(REPO_ROOT).parts)
                     and "tests" not in p.relative_to(REPO_ROOT).parts)
    parts = []
    for source in sources:
        parts.append(f"==== {source.relative_to(REPO_ROOT)} ====\n{source.read_text()}")
    parts.append(f"==== resolved config ====\n{json.dumps(config, indent=1, default=str)}")
    parts.append(f"==== environment ====\n{environment_report(device, world)}")
    parts.append(f"==== log ====\n{Path(log_path).read_text()}")
    (folder / f"{run_id}.txt").write_text("\n\n".join(parts))
    figures = dict(result, seed=tc["seed"], git_commit=git_commit(), gpu=device.name,
                   world_size=world.world_size,
                   gpu_count=world.world_size if device.kind == "cuda" else 0,
                   torch=torch.__version__, run_id=run_id, date=date,
                   target_val_loss=tc["target_val_loss"], config_name=tc["run_name"])
    (folder / f"{run_id}.json").write_text(json.dumps(figures, indent=1))
    return folder / f"{run_id}.json"


def prepare_data(data_config, world, device):
    """ensure_data on one process per node while the others wait; whether it went well on every
    node (a failure is printed where it happened)."""
    ok = True
    if world.local_rank == 0:
        try:
            ensure_data(data_config)
        except (ConfigError, ShardError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            ok = False
    return world.all_true(ok, world.torch_device(device.kind))


def run_training(config, resume=None, benchmark=False, profile=False, config_path=None,
                 world=None):
    """Set up the device (and under torchrun the process group), train or benchmark, tear
    down; returns an exit status."""
    world = world or World()
    utils.setup_environment(config["compile_config"]["cache_dir"])
    try:
        device = utils.detect_device(config["training_config"]["device"], world.local_rank)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    world.init(device.kind)
    try:
        if not prepare_data(config["data_config"], world, device):
            return 2
        utils.configure_torch(device, config["compile_config"])
        return train_and_report(config, device, world, resume, benchmark, profile, config_path)
    finally:
        world.shutdown()


def train_and_report(config, device, world, resume, benchmark, profile, config_path):
    """Build the manager and run it; failures become a logged message and an exit status."""
    tc, lc = config["training_config"], config["logging_config"]
    state = None
    if resume:  # read first: a resumed run keeps its run id, so its log and record
        try:
            state = read_checkpoint(resume, world.torch_device(device.kind))
        except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
            print(f"error: cannot read checkpoint {resume}: {exc}", file=sys.stderr)
            return 2
    run_id = (state or {}).get("run_id") or str(uuid.uuid4())  # older checkpoints have none
    run_id = world.broadcast_object(run_id, world.torch_device(device.kind))
    log_path = Path(repo_path(lc["log_dir"])) / f"{run_id}.txt"
    if world.is_main:
        logger = RunLogger(log_path, lc, config, Schedule(config).total, tc["run_name"])
    else:
        logger = RankLogger(log_path, world.rank)
    devices = f"{world.world_size} x {device.name}" if world.distributed else device.name
    logger.print(f"run {run_id} | config {config_path} | device {devices} | log {log_path}")
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
        if config["compile_config"]["enabled"]:
            logger.print(f"compile and warm-up: {manager.warmup():.1f}s (not counted)")
        result = manager.run()
        reached = result["val_loss"] <= tc["target_val_loss"]
        logger.print(f"final val_loss {result['val_loss']:.4f} | train_time "
                     f"{result['train_time']:.1f}s ({result['train_time'] / 60:.2f} min) | "
                     f"{result['steps']} steps | target {tc['target_val_loss']} "
                     f"{'reached' if reached else 'not reached'}")
        if not result["early_stopped"] and world.is_main:
            record = write_record(config, result, log_path, device, run_id, world)
            logger.print(f"record attempt written: {record}")
        return 0
    except (ShardError, ConfigError, FileNotFoundError) as exc:
        logger.error(exc)
        return 2
    except TrainingError as exc:
        logger.error(exc)
        return 1
    except torch.cuda.OutOfMemoryError:
        micro = manager.schedule.micro_batch_tokens if manager else "?"
        multiple = tc["batch_size_multiple"]
        logger.error(
            f"CUDA out of memory with micro-batches of {micro} tokens. Lower "
            f"BATCH_SIZE_MULTIPLE (now {multiple}; e.g. BATCH_SIZE_MULTIPLE="
            f"{max(1, multiple // 2)}): the tokens per optimizer step stay the same, only the "
            "micro-batch shrinks")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if manager is not None:
            manager.train_loader.close()
        logger.close()
