"""Training: the stage table and what it asks at each step, the TrainingManager loop,
validation, checkpoints and logs.

The schedule is one table of stages, a row each (as the speedrun's ``TRAINING_STAGES``), and
``Schedule.at(step)`` answers what holds at a step: tokens, windows, learning rate, momentum,
whether the embedding is untied, whether a stage begins. It is a pure function of the step,
so a resumed run recomputes exactly what an uninterrupted one would. ``TrainingManager.apply``
is the one place where the model and the optimizer are put in that state.

Under torchrun (``distributed.World``) each rank takes its own micro-batches of every step, so
the tokens per step, and the math, are those of one process; the optimizer averages the
gradients over the ranks. Rank 0 alone prints, logs and checkpoints.
"""

import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import averaging
import checkpoints
from data.loader import DataLoader, validation_pieces
from distributed import World
from layers.embeddings import collect_table_grads
from layers.masks import document_ids
from layers.sampled import CandidateSampler
from model import build_model, model_config
from optimizers import build_optimizer
from utils import ConfigError, build_section, check_ranges, repo_path


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, out of memory); the message says why and where."""


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal (SIGINT, SIGTERM) after saving; the exit status is
    128 + the signal's number, as a shell reports a process a signal ended."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """Within ``with``: SIGINT and SIGTERM are recorded in ``received`` (the first one) instead
    of interrupting, so the code in progress finishes; the previous handlers come back after.
    Not ``enabled``: nothing changes (Ctrl-C raises KeyboardInterrupt as usual)."""

    STOP = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.received = None
        self.previous = {}

    def __enter__(self):
        if self.enabled:
            self.previous = {s: signal.signal(s, self._record) for s in self.STOP}
        return self

    def _record(self, signum, frame):
        if self.received is None:
            self.received = signum

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


@dataclass(frozen=True)
class TrainingConfig:
    """``training_config``: the run's device, sizes, validation, checkpoints and records."""

    device: str  # cuda | cpu
    seed: int
    run_name: str
    max_seq_len: int  # longest segment (document head) in a packed micro-batch
    batch_size_multiple: int  # micro-batch = batch_size_multiple x max_seq_len tokens
    val_tokens: int
    val_chunk_tokens: int  # validation attends within chunks of this many tokens
    sum_loss_scale: float | None  # gradient: this x that of the summed loss; None: the mean
    val_loss_every: int  # 0: only at the end
    target_val_loss: float
    early_stop_steps: int | None  # stop after this many steps, the schedule unchanged
    grad_clip_norm: float  # 0: off
    checkpoint_every: int  # 0: off
    keep_checkpoints: int  # the newest this many of a run's checkpoints stay; 0: all
    checkpoint_dir: str  # checkpoints and the final model
    save_on_interrupt: bool  # SIGINT or SIGTERM: checkpoint after the step in progress
    save_model: bool  # the trained model at the end of every full run
    records_dir: str
    benchmark_steps: int  # timed steps per stage in --benchmark mode
    # the embedding tables' gradients added in place, row by row (layers/embeddings.py)
    table_grads_in_place: bool = False

    def __post_init__(self):
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"training_config.device must be 'cuda' or 'cpu', not "
                              f"{self.device!r}")
        check_ranges("training_config", self,
                     positive=("max_seq_len", "batch_size_multiple", "val_tokens",
                               "target_val_loss", "early_stop_steps", "benchmark_steps"),
                     non_negative=("seed", "val_loss_every", "grad_clip_norm",
                                   "checkpoint_every", "keep_checkpoints"))
        if self.seed >= 2**32:
            raise ConfigError(f"training_config.seed must be below 2**32 (numpy's seed), got "
                              f"{self.seed}")
        if not self.run_name or set(self.run_name) & set("/\\"):
            raise ConfigError(f"training_config.run_name {self.run_name!r} names files: give "
                              "a non-empty name without slashes")

    @property
    def micro_batch_tokens(self):
        return self.batch_size_multiple * self.max_seq_len

    def loss_factor(self, plan_accumulation: int, world_size: int):
        """What a micro-batch's mean loss is multiplied by before its backward pass, so that
        the step's gradient, once the optimizer has averaged it over the ranks, is the mean over
        the step's tokens, or sum_loss_scale times their sum."""
        if self.sum_loss_scale is None:
            return 1.0 / plan_accumulation
        return self.micro_batch_tokens * world_size * self.sum_loss_scale


# ----------------------------------------------------------------------------------------------
# The schedule: a table of stages


@dataclass(frozen=True)
class Stage:
    """One row of the stage table. The loss weights move linearly from their start value at
    the stage's first step towards their ``_end`` value (reached at the next stage's first)."""

    tokens: int  # tokens per optimizer step
    windows: tuple  # (short, long) attention windows, in blocks
    lr_mul: float  # learning-rate multiplier (larger batches take larger steps)
    duration: float | None = None  # share of the scheduled iterations; None: the extension
    max_seq_len: int | None = None  # longest training segment; None: training_config's
    mtp_weights: tuple = (1.0,)  # loss weight of the next token, the one after, ... (MTP)
    mtp_weights_end: tuple | None = None
    prefix_weight: float = 0.0  # loss weight of the next token's longest prefix token
    prefix_weight_end: float | None = None

    def __post_init__(self):
        check_windows("schedule.stages: windows", self.windows)
        check_ranges("schedule.stages", self, positive=("tokens", "duration"),
                     non_negative=("lr_mul",))
        weights = self.mtp_weights + (self.mtp_weights_end or ())
        if not self.mtp_weights or any(not isinstance(w, (int, float)) or w < 0
                                       for w in weights):
            raise ConfigError(f"schedule.stages: mtp_weights must be non-negative numbers, the "
                              f"next token's first, got {self.mtp_weights}")
        if self.mtp_weights_end is not None and len(self.mtp_weights_end) != len(
                self.mtp_weights):
            raise ConfigError("schedule.stages: mtp_weights_end needs as many weights as "
                              f"mtp_weights ({self.mtp_weights} -> {self.mtp_weights_end})")
        if self.prefix_weight < 0 or (self.prefix_weight_end or 0) < 0:
            raise ConfigError("schedule.stages: prefix weights must be non-negative")


def check_windows(name, windows):
    if not (isinstance(windows, tuple) and len(windows) == 2
            and all(isinstance(w, int) and w >= 1 for w in windows)):
        raise ConfigError(f"{name} must be two positive ints (short, long), got {windows!r}")


@dataclass(frozen=True)
class ScheduleConfig:
    """``schedule``: the stage table and the curves that run across it."""

    num_scheduled_iterations: int
    num_extension_iterations: int  # after the stages, at the final lr, the last row's values
    stages: tuple  # Stage rows; the last has no duration and holds during the extension
    validation_windows: tuple  # (short, long) for the final validation, without YaRN
    warmup_steps: int
    cooldown_frac: float  # linear decay to final_lr_ratio over this last share of the stages
    final_lr_ratio: float
    final_lr_absolute: bool  # the cooldown ends at final_lr_ratio itself, not x the stage's lr_mul
    momentum_start: float  # matrix-optimizer momentum: start -> peak -> end
    momentum_peak: float
    momentum_end: float
    momentum_warmup_steps: int
    momentum_cooldown_steps: int
    split_frac: float  # untie the embedding from the lm_head at this share of the stages
    freeze_scalars_steps: int  # the scalar Adam holds still this long when a stage begins
    adam_every: int  # Adam steps on every n-th step, with the gradients of the n summed
    # defaults: configs saved in checkpoints and models before these keys still load
    tail_ema_window: int = 0  # averaging.py: lm_head and embed, the last steps (0: off)
    tail_ema_blend: float = 0.65  # the share of the average in the final weights
    tail_average_window: int = 0  # averaging.py: V/O, MLP, value embeddings (record: 250)
    bank_blend_window: int = 0  # averaging.py: Q/K, V/O, MLP blended (record: 298)
    bank_blend: float = 0.55  # the bank blend's share of its average
    bank_blend_correction: float = 0.2007  # less this where the tail average shipped first
    # layers/sampled.py: ((first step, candidates), ...), the softmax over that many
    # candidates from that step on (0: the full vocabulary); record #92: ((0, 10240), (681,
    # 14336), (965, 24576), (1107, 0)). Each set is shared by sampled_softmax_rows rows (the
    # record's: a rank's batch, 16,384 tokens in its first stage)
    sampled_softmax: tuple = ()
    sampled_softmax_rows: int = 16384

    def __post_init__(self):
        check_ranges("schedule", self,
                     positive=("num_scheduled_iterations", "adam_every"),
                     non_negative=("num_extension_iterations", "warmup_steps", "final_lr_ratio",
                                   "momentum_warmup_steps", "momentum_cooldown_steps",
                                   "freeze_scalars_steps", "tail_ema_window",
                                   "tail_average_window", "bank_blend_window"),
                     fractions=("cooldown_frac", "split_frac", "tail_ema_blend", "bank_blend",
                                "bank_blend_correction"),
                     below_one=("momentum_start", "momentum_peak", "momentum_end"))
        total = self.num_scheduled_iterations + self.num_extension_iterations
        for key in ("tail_ema_window", "tail_average_window", "bank_blend_window"):
            if getattr(self, key) > total:
                raise ConfigError(f"schedule.{key}={getattr(self, key)} is longer than the "
                                  f"run's {total} steps")
        steps = [pair[0] for pair in self.sampled_softmax if isinstance(pair, tuple)]
        if any(not (isinstance(pair, tuple) and len(pair) == 2
                    and all(isinstance(v, int) and v >= 0 for v in pair) and pair[1] % 16 == 0)
               for pair in self.sampled_softmax) or steps != sorted(set(steps)):
            raise ConfigError(f"schedule.sampled_softmax must be (first step, candidates) pairs "
                              f"of non-negative ints, steps ascending, candidates a multiple "
                              f"of 16 (0: the full softmax), got {self.sampled_softmax}")
        if self.sampled_softmax_rows <= 0:
            raise ConfigError(f"schedule.sampled_softmax_rows must be > 0, got "
                              f"{self.sampled_softmax_rows}")
        if self.bank_blend_correction > self.bank_blend:
            raise ConfigError(f"schedule.bank_blend_correction ({self.bank_blend_correction}) "
                              f"must not exceed bank_blend ({self.bank_blend})")
        if self.tail_ema_window and self.adam_every != 2:
            raise ConfigError("schedule.tail_ema_window needs adam_every=2: the average follows "
                              "record #92's cadence, Adam moving the lm_head and the embedding "
                              f"on odd steps (adam_every is {self.adam_every})")

    @classmethod
    def from_dict(cls, values: dict) -> "ScheduleConfig":
        config = build_section(cls, "schedule", values)
        rows = config.stages if isinstance(config.stages, tuple) else ()
        stages = tuple(build_section(Stage, f"schedule.stages[{i}]", row)
                       for i, row in enumerate(rows))
        return cls(**{**vars(config), "stages": stages})


@dataclass(frozen=True)
class StepPlan:
    """What the schedule asks at one step."""

    step: int
    stage: int  # row of the stage table
    tokens: int
    accumulation: int  # micro-batches per process
    windows: tuple  # (short, long) in blocks
    max_seq_len: int  # longest training segment
    mtp_weights: tuple  # loss weights of the next tokens
    prefix_weight: float  # loss weight of the next token's prefix token
    lr_factor: float  # times each group's lr
    momentum: float  # of the matrix optimizer
    adam: bool  # Adam steps after this step's gradients
    untied: bool  # the embedding trains apart from the lm_head from this step on
    transition: bool  # a stage with other tokens or windows begins: the scalars freeze
    candidates: int = 0  # the sampled softmax's candidates per set (0: the full softmax)


class Schedule:
    """The stage table over the steps: ``at(step)`` is what holds at ``step``.

    Steps 0 .. num_scheduled_iterations-1 go through the rows with durations, each taking its
    share of them; the extension iterations after them run the last row at the final lr. The
    tokens of a step are those of the config whatever the world size: each of ``world_size``
    processes accumulates its share in micro-batches of ``multiple`` x ``seq`` tokens.
    """

    def __init__(self, config: ScheduleConfig, multiple: int, seq: int, world_size: int = 1):
        self.config = config
        self.scheduled = config.num_scheduled_iterations
        self.total = self.scheduled + config.num_extension_iterations
        self.multiple, self.seq, self.world_size = multiple, seq, world_size
        self.micro_batch_tokens = multiple * seq
        self.round_tokens = self.micro_batch_tokens * world_size  # a micro-batch per process
        self.stages_table = config.stages
        self.untie_step = round(config.split_frac * self.scheduled)
        self.validation_windows = config.validation_windows
        # the loss weights of the tokens ahead, as many as the widest stage has
        self.mtp_width = max(len(stage.mtp_weights) for stage in config.stages or ((),)) or 1
        self._check()
        ends, total = [], 0.0
        for stage in self.stages_table[:-1]:
            total += stage.duration
            ends.append(round(total * self.scheduled))
        # first step of each row; the extension row starts after the scheduled iterations
        self.starts = [0, *ends[:-1], self.scheduled]
        if any(b <= a for a, b in zip(self.starts[:-1], self.starts[1:], strict=True)):
            raise ConfigError(f"schedule: a stage gets no steps of the "
                              f"{self.scheduled} scheduled iterations (stage starts "
                              f"{self.starts[:-1]}): raise num_scheduled_iterations or "
                              f"lengthen the stage")

    def _check(self):
        if not self.stages_table:
            raise ConfigError("schedule.stages must be a tuple of stage rows (dicts)")
        *rows, extension = self.stages_table
        if not rows or any(s.duration is None or s.duration <= 0 for s in rows):
            raise ConfigError("schedule.stages: every row but the last needs a positive "
                              "duration (its share of the scheduled iterations)")
        if extension.duration is not None:
            raise ConfigError("schedule.stages: the last row is the extension and takes no "
                              "duration")
        if abs(sum(s.duration for s in rows) - 1) > 1e-9:
            raise ConfigError(f"schedule.stages: the durations sum to "
                              f"{sum(s.duration for s in rows)}, not 1")
        for stage in self.stages_table:
            if stage.tokens % self.round_tokens:
                raise ConfigError(f"schedule.stages: tokens {stage.tokens} is not a multiple of "
                                  f"{self.describe_round()}; {self._batch_fix()}")
        check_windows("schedule.validation_windows", self.config.validation_windows)
        for stage in self.stages_table:
            if stage.max_seq_len is not None and not 1 <= stage.max_seq_len <= self.seq:
                raise ConfigError(f"schedule.stages: max_seq_len {stage.max_seq_len} must be "
                                  f"between 1 and training_config.max_seq_len ({self.seq})")
        rows = self.config.sampled_softmax_rows
        if self.config.sampled_softmax and self.micro_batch_tokens % rows:
            raise ConfigError(f"schedule.sampled_softmax_rows ({rows}) must divide "
                              f"{self.describe_round()}")

    def _batch_fix(self):
        """The largest smaller BATCH_SIZE_MULTIPLE that divides every stage, if any."""
        for multiple in range(self.multiple - 1, 0, -1):
            if not any(s.tokens % (multiple * self.seq * self.world_size)
                       for s in self.stages_table):
                return f"lower BATCH_SIZE_MULTIPLE (e.g. BATCH_SIZE_MULTIPLE={multiple})"
        processes = " or the number of processes" if self.world_size > 1 else ""
        return f"no BATCH_SIZE_MULTIPLE fits: change the schedule{processes}"

    def describe_round(self):
        text = f"the micro-batch ({self.micro_batch_tokens} = batch_size_multiple x max_seq_len"
        if self.world_size > 1:
            text += f", x {self.world_size} processes = {self.round_tokens}"
        return text + " tokens)"

    def stage_of(self, step):
        return sum(1 for s in self.starts if s <= step) - 1

    def at(self, step) -> StepPlan:
        index = self.stage_of(step)
        stage = self.stages_table[index]
        before = self.stages_table[index - 1] if index else stage
        transition = (step == self.starts[index] and index > 0
                      and (stage.tokens, stage.windows) != (before.tokens, before.windows))
        end = self.starts[index + 1] if index + 1 < len(self.starts) else self.total
        along = (step - self.starts[index]) / (end - self.starts[index])  # [0, 1) in the stage

        def moved(start, finish):
            return start if finish is None else start + (finish - start) * along

        mtp_end = stage.mtp_weights_end or (None,) * len(stage.mtp_weights)
        return StepPlan(step=step, stage=index, tokens=stage.tokens,
                        accumulation=stage.tokens // self.round_tokens, windows=stage.windows,
                        max_seq_len=stage.max_seq_len or self.seq,
                        mtp_weights=tuple(moved(a, b) for a, b in zip(stage.mtp_weights, mtp_end,
                                                                      strict=True)),
                        prefix_weight=moved(stage.prefix_weight, stage.prefix_weight_end),
                        lr_factor=self._lr_factor(step, stage.lr_mul),
                        momentum=self._momentum(step),
                        adam=(step + 1) % self.config.adam_every == 0,
                        untied=step >= self.untie_step, transition=transition,
                        candidates=self._candidates(step))

    def _candidates(self, step):
        sizes = [size for first, size in self.config.sampled_softmax if first <= step]
        return sizes[-1] if sizes else 0

    def _lr_factor(self, step, lr_mul):
        """Warm-up, the stage's lr_mul, then a linear cooldown to final_lr_ratio (x lr_mul, or
        itself when final_lr_absolute) over the last cooldown_frac of the scheduled
        iterations; the extension stays at the end value."""
        c = self.config
        progress = min(step, self.scheduled) / self.scheduled
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps * lr_mul
        if progress < 1 - c.cooldown_frac:
            return lr_mul
        ramp = min((progress - (1 - c.cooldown_frac)) / max(c.cooldown_frac, 1e-12), 1.0)
        if c.final_lr_absolute:
            return lr_mul * (1 - ramp) + c.final_lr_ratio * ramp
        return (1.0 + ramp * (c.final_lr_ratio - 1.0)) * lr_mul

    def _momentum(self, step):
        """Matrix-optimizer momentum: warm up, hold, cool down over the last steps."""
        c = self.config
        warm, cool = c.momentum_warmup_steps, c.momentum_cooldown_steps
        if step < warm:
            return c.momentum_start + (c.momentum_peak - c.momentum_start) * step / warm
        left = self.total - step
        if left < cool:
            return c.momentum_end + (c.momentum_peak - c.momentum_end) * left / cool
        return c.momentum_peak

    def spans(self):
        """(first step, end) of each stage that has steps, the extension included."""
        bounds = [*self.starts, self.total]
        return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


# ----------------------------------------------------------------------------------------------
# Logging


@dataclass(frozen=True)
class LoggingConfig:
    """``logging_config``."""

    log_dir: str
    progress_bar: bool  # tqdm when stdout is a terminal
    wandb: bool  # online when logged in, offline otherwise; WANDB_MODE=disabled turns it off
    wandb_project: str


class RunLogger:
    """Prints to stdout (under a tqdm bar on a terminal), always to a text file, and to W&B
    when it is installed and enabled."""

    def __init__(self, path, logging_config: LoggingConfig, raw_config: dict, total_steps: int,
                 run_name: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1)
        self.bar = None
        if logging_config.progress_bar and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, dynamic_ncols=True, leave=False)
        self.wandb = self._start_wandb(logging_config, raw_config, run_name)

    def _start_wandb(self, logging_config, raw_config, run_name):
        if not logging_config.wandb or os.environ.get("WANDB_MODE") == "disabled":
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
        return wandb.init(project=logging_config.wandb_project, name=run_name,
                          config=raw_config, mode=mode, dir=str(self.path.parent))

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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TrainingManager:
    """Owns the model, optimizers, data and schedule of a run (``run.RunConfig``); ``run``
    trains to the end or the early stop.

    With several ranks (``world``), every rank builds one; they stay in step through the
    collectives of the optimizer, the loss and validation.
    """

    def __init__(self, config, device, logger=None, world=None):
        self.config = config
        self.tc: TrainingConfig = config.training
        self.schedule: Schedule = config.schedule
        self.device = device
        self.world = world or World()
        self.logger = logger
        seed_everything(self.tc.seed)
        torch_device = self.world.torch_device(device.kind)
        self.model = build_model(config.model).to(torch_device)
        # Every rank seeds alike; rank 0's weights make sure that they all start the same.
        self.world.broadcast_tensors([p.detach() for p in self.model.parameters()])
        self.optimizer = build_optimizer(self.model, config.optimizer, self.world)
        self.table_grads = self.model.grads_in_place() if self.tc.table_grads_in_place else []
        self.compiled = (torch.compile(self.model, dynamic=False, fullgraph=True)
                         if config.compile.enabled else self.model)
        dc, seq, micro = config.data, self.tc.max_seq_len, self.tc.micro_batch_tokens
        ranks = dict(rank=self.world.rank, world_size=self.world.world_size,
                     vocab_size=config.model.vocab_size)
        self.train_loader = DataLoader(repo_path(dc.train_pattern), micro, seq,
                                       lookahead=dc.packing_lookahead, device=torch_device,
                                       prefetch=dc.prefetch, **ranks)
        self.val_pieces, self.val_tokens = validation_pieces(
            repo_path(dc.val_pattern), self.tc.val_tokens, self.tc.val_chunk_tokens, micro,
            validation_context(config.model, self.schedule), device=torch_device, **ranks)
        if not self.val_pieces:
            raise ConfigError(f"the val shards {dc.val_pattern} hold less than one chunk of "
                              f"val_chunk_tokens={self.tc.val_chunk_tokens:,} tokens per "
                              "process: lower it or add val data")
        if self.val_tokens < self.tc.val_tokens and logger is not None:
            logger.print(f"note: the val shards hold only {self.val_tokens:,} tokens in whole "
                         f"chunks, fewer than val_tokens={self.tc.val_tokens:,}: validating "
                         "on those")
        # [the loss weights of the tokens ahead..., of the prefix token], set by apply();
        # validation scores the next token alone
        self.loss_weights = torch.zeros(self.schedule.mtp_width + 1, device=torch_device)
        self.val_weights = torch.zeros_like(self.loss_weights)
        self.val_weights[0] = 1.0
        self.sampler = None  # the candidate sets of the sampled softmax (layers/sampled.py)
        sc = self.schedule.config
        if sc.sampled_softmax:
            largest = max(size for _, size in sc.sampled_softmax)
            if largest > config.model.padded_vocab:
                raise ConfigError(f"schedule.sampled_softmax asks {largest} candidates, more "
                                  f"than the vocabulary's {config.model.padded_vocab}")
            groups = max(stage.tokens for stage in self.schedule.stages_table)
            self.sampler = CandidateSampler(config.model.padded_vocab,
                                            groups // sc.sampled_softmax_rows, torch_device)
        self._flops = {}  # flops_per_token by windows, for MFU
        self.run_id = None  # kept in checkpoints: a resumed run appends to the same log
        self.step = 0  # optimizer steps completed
        self.train_time = 0.0  # seconds of training, validation and compile excluded
        self.history = []  # (step, train time, val loss)
        sc = self.schedule.config
        self.tail_ships = None
        if sc.tail_ema_window or sc.tail_average_window or sc.bank_blend_window:
            self.tail_ships = averaging.TailShips(averaging.model_groups(self.model), sc,
                                                  self.schedule.total)

    # -- the schedule -------------------------------------------------------------------------

    def apply(self, plan: StepPlan):
        """Put the model, the data and the optimizer in the state the schedule asks for at a
        step: the windows (with YaRN), the segment length, the untie, the scalar freeze, the lr
        factor and the momentum."""
        self.model.yarn.set_windows(plan.windows)
        self.train_loader.set_max_seq_len(plan.max_seq_len)
        if plan.untied and self.model.tie.tied:
            self.model.tie.untie(self.optimizer)
        if plan.transition:
            self.optimizer.freeze_scalars(self.schedule.config.freeze_scalars_steps)
        self.optimizer.set_lr_factor(plan.lr_factor)
        self.optimizer.set_momentum(plan.momentum)
        self.optimizer.set_step(plan.step)
        mtp = plan.mtp_weights + (0.0,) * (self.schedule.mtp_width - len(plan.mtp_weights))
        self.loss_weights.copy_(torch.tensor([*mtp, plan.prefix_weight]), non_blocking=True)

    # -- one step -----------------------------------------------------------------------------

    def train_step(self):
        """One optimizer step of the schedule; returns the mean loss over all ranks as a
        device tensor."""
        plan = self.schedule.at(self.step)
        self.apply(plan)
        loss = self.accumulate(plan)
        self.optimizer_step(plan.adam)
        self.step += 1
        return self.world.all_reduce_mean(loss)

    def accumulate(self, plan: StepPlan):
        """Gradients of the step's batch by accumulation over fixed-size micro-batches, each
        loss scaled so that the gradient does not depend on the split (``loss_factor``; the
        optimizer averages it over the ranks). Returns this rank's mean loss."""
        total = torch.zeros((), device=self.model.lm_head.device)
        factor = self.tc.loss_factor(plan.accumulation, self.world.world_size)
        for index in range(plan.accumulation):
            inputs, targets = self.train_loader.next_batch()
            # without candidates the call is validation's: one graph for both
            sets = self.candidates(plan, index, targets)
            loss = self.compiled(inputs, targets, document_ids(inputs), self.loss_weights,
                                 *(() if sets is None else (sets,)))
            (loss * factor).backward()
            total += loss.detach()
        return total / plan.accumulation

    def candidates(self, plan: StepPlan, index: int, targets):
        """The sampled softmax's (G, P) candidate sets of a micro-batch (None: the full
        softmax). Its rows go in groups of sampled_softmax_rows, numbered through the step's
        micro-batches in the order the ranks share them out, each group with its own place in
        the sweep: any number of ranks builds the same sets."""
        if not plan.candidates:
            return None
        rows = self.schedule.config.sampled_softmax_rows
        per_batch = targets.numel() // rows
        first = (index * self.world.world_size + self.world.rank) * per_batch
        return torch.stack([self.sampler.build(targets[j * rows:(j + 1) * rows],
                                               plan.candidates, first + j)
                            for j in range(per_batch)])

    def optimizer_step(self, adam=True):
        """The optimizer's step on the accumulated gradients; ``adam`` off steps the matrix
        group alone and keeps the Adam gradients for the next step (schedule.adam_every)."""
        collect_table_grads(self.table_grads)
        self.model.tie.fold_grad()
        if self.tc.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip_norm)
        self.optimizer.step(adam)
        if adam:
            self.model.tie.sync()
        self.optimizer.zero_grad(adam)

    def validate(self):
        """The mean next-token loss over the validation tokens (``validation_pieces``); each
        rank scores as many, its share of them.

        Compiled, it runs the training graph (grad mode on, no backward pass): a graph for
        no_grad would be a second compile, for a pass that the train time does not count."""
        with torch.set_grad_enabled(self.compiled is not self.model):
            # each piece's loss is its scored rows' sum over all its rows
            total = sum(self.compiled(inputs, targets, document_ids(inputs),
                                      self.val_weights).detach() * inputs.numel()
                        for inputs, targets in self.val_pieces)
        scored = self.val_tokens // self.world.world_size
        return self.world.all_reduce_mean(total / scored).item()

    # -- compile warm-up ------------------------------------------------------------------------

    def warmup(self):
        """Compile the graphs the run uses (the model's one training graph, which validation
        shares, and the optimizer's updates) with the first steps on real batches, up to one
        with an Adam update, then restore weights, optimizer, data position, gradients and RNG:
        the timed run starts from exactly the state it would have had without warm-up.
        Returns seconds spent."""
        start = time.perf_counter()
        # the snapshot waits in host memory: on the GPU it would add the weights and the
        # optimizer's state (7.3 GB for config/base.py) to the peak of the warm-up's steps
        model_state = checkpoints.to_host(self.model.state_dict())
        optimizer_state = checkpoints.to_host(self.optimizer.state_dict())
        loader_state = self.train_loader.state_dict()
        rng = checkpoints.rng_state()
        sampler_state = self.sampler.state_dict() if self.sampler else None
        pending = {p: p.grad for p in self.model.parameters()}
        self.optimizer.zero_grad()
        step = self.step
        self.step = 0
        for _ in range(self.schedule.config.adam_every):  # a step with Adam's update too
            self.train_step()
        # the graph of each other candidate count of the sampled softmax (0: the full one)
        sizes = {size for _, size in self.schedule.config.sampled_softmax} | {0}
        for size in sorted(sizes - {self.schedule.at(0).candidates}):
            plan = replace(self.schedule.at(0), accumulation=1, candidates=size)
            self.accumulate(plan)
            self.optimizer.zero_grad()
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)
        for p, grad in pending.items():
            p.grad = grad
        self.train_loader.load_state_dict(loader_state)
        checkpoints.set_rng_state(rng)
        if self.sampler:
            self.sampler.load_state_dict(sampler_state)
        self.step = step
        synchronize(self.device)
        return time.perf_counter() - start

    # -- checkpoints and the trained model ------------------------------------------------------

    @property
    def file_prefix(self):
        """This run's file names start with the run name and its id's first 8 characters."""
        return f"{self.tc.run_name}_{self.run_id[:8]}" if self.run_id else self.tc.run_name

    @property
    def checkpoint_dir(self):
        return Path(repo_path(self.tc.checkpoint_dir))

    def checkpoint_state(self):
        # Gradients still waiting for Adam (schedule.adam_every) are part of the state: the
        # mean over the ranks, which every rank of a resumed run holds (the optimizer averages
        # each rank's gradient, so the mean of such copies plus each rank's own is right).
        pending = {name: self.world.all_reduce_mean(p.grad.clone())
                   for name, p in self.model.named_parameters() if p.grad is not None}
        return {"step": self.step, "run_id": self.run_id, "train_time": self.train_time,
                "history": self.history, "model": self.model.state_dict(),
                "gradients": pending, "optimizer": self.optimizer.state_dict(),
                "loader": self.train_loader.state_dict(), "rng": checkpoints.rng_state(),
                "tail_ema": self.tail_ships.state_dict() if self.tail_ships is not None else {},
                "sampler": self.sampler_state() if self.sampler else {},
                "config": self.config.raw}

    def sampler_state(self):
        """The sampled softmax's places in the sweep, each group's from the rank that builds
        its sets (group g: rank (g // micro-batch groups) % world size)."""
        places = self.sampler.places.double()
        per_batch = self.tc.micro_batch_tokens // self.schedule.config.sampled_softmax_rows
        owner = torch.arange(places.numel(), device=places.device) // per_batch
        mine = torch.where(owner % self.world.world_size == self.world.rank, places, 0.0)
        places = self.world.all_reduce_mean(mine) * self.world.world_size
        return {"places": places.round().long().cpu()}

    def save_checkpoint(self, path):
        """Write the training state at ``path`` (checkpoints.write: safetensors and JSON,
        atomic).

        Every rank calls it (the optimizer state is gathered from all); rank 0 writes the one
        file. The loader's state is a position in the stream all ranks share, so rank 0's
        resumes every rank, on any world size.
        """
        state = self.checkpoint_state()
        if self.world.is_main:
            checkpoints.write(path, "checkpoint", state)
        return Path(path)

    def write_checkpoint(self):
        """The run's next checkpoint, by step, keeping the newest ``keep_checkpoints``."""
        path = self.save_checkpoint(
            checkpoints.checkpoint_path(self.checkpoint_dir, self.file_prefix, self.step))
        if self.world.is_main:
            for old in checkpoints.prune(self.checkpoint_dir, self.file_prefix,
                                         self.tc.keep_checkpoints):
                self.logger.print(f"removed {old} (keep_checkpoints={self.tc.keep_checkpoints})")
        return path

    def load_checkpoint(self, path, state=None):
        """Resume from the checkpoint at ``path`` (``state``: its contents, if already read)."""
        if state is None:
            _, state = checkpoints.read(path, self.model.lm_head.device, kind="checkpoint")
        saved = model_config(state["config"]["model_config"])
        if saved != self.config.model:
            raise ConfigError(f"checkpoint {path} was written for a different model_config")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ConfigError(f"checkpoint {path} comes from another version of the trainer "
                              f"({str(exc).splitlines()[0]}); resume it with that version "
                              "(git log) or start the run again") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        for name, p in self.model.named_parameters():
            p.grad = state["gradients"].get(name)
        self.train_loader.load_state_dict(state["loader"])
        checkpoints.set_rng_state(state["rng"])
        self.step, self.train_time = state["step"], state["train_time"]
        self.run_id = state["run_id"]
        self.history = [tuple(entry) for entry in state["history"]]
        if self.tail_ships is not None:
            self.tail_ships.load_state_dict(state.get("tail_ema", {}))
        if self.sampler and state.get("sampler"):  # none: written without the sampled softmax
            self.sampler.load_state_dict(state["sampler"])

    def save_model(self, val_loss):
        """The trained weights and the run's config, for sample.py and evaluate.py
        (checkpoints.load_model); rank 0 writes them. Returns the path."""
        path = checkpoints.model_path(self.checkpoint_dir, self.file_prefix)
        if self.world.is_main:
            checkpoints.write(path, "model", {
                "model": self.model.state_dict(), "config": self.config.raw,
                "run_id": self.run_id, "step": self.step, "val_loss": val_loss})
        return path

    # -- the loop -----------------------------------------------------------------------------

    def run(self):
        """Train until the schedule ends or early_stop_steps; returns the result dict.

        With one process, SIGINT and SIGTERM take effect when the step in progress ends: the
        run writes a checkpoint (``save_on_interrupt``) and raises ``Interrupted``; signals that
        come meanwhile change nothing, so the save survives the second SIGINT that ``uv run``
        forwards. After the last step the run finishes (final validation, the model) first.
        """
        log = self.logger.print
        stop = self.schedule.total
        if self.tc.early_stop_steps is not None:
            stop = min(stop, self.tc.early_stop_steps)
        every = self.tc.val_loss_every
        if self.world.is_main:
            for partial in checkpoints.remove_partials(self.checkpoint_dir, self.file_prefix):
                log(f"removed {partial}: a partial checkpoint that an interrupted write left")
        synchronize(self.device)
        started = time.perf_counter()
        with Signals(enabled=not self.world.distributed) as signals:
            try:
                while self.step < stop and signals.received is None:
                    step_start = time.perf_counter()
                    loss = self.train_step().item()
                    synchronize(self.device)
                    step_time = time.perf_counter() - step_start
                    self.train_time += step_time
                    if not math.isfinite(loss):
                        raise TrainingError(f"loss is {loss} at step {self.step}: training "
                                            f"stopped (log kept at {self.logger.path})")
                    self.log_step(loss, step_time)
                    if self.tail_ships is not None:
                        self.tail_ships.tick(self.step - 1)
                    if self.tc.checkpoint_every and self.step % self.tc.checkpoint_every == 0:
                        log(f"checkpoint written: {self.write_checkpoint()}")
                    if (every and self.step % every == 0 and self.step < stop
                            and signals.received is None):
                        self.log_validation(self.validate())
            except KeyboardInterrupt:
                if self.world.distributed:  # no handler defers signals there: ranks stop at
                    # different points, and a collective to save the state could hang
                    log(f"interrupted after step {self.step}; with several processes no "
                        "checkpoint is written on interrupt (use --checkpoint_every)")
                raise
            if signals.received is not None:
                self.stop_on_signal(signals.received)
            if self.tail_ships is not None and self.step == self.schedule.total:
                shipped = self.tail_ships.ship()
                log(f"tail averages shipped into the weights: {', '.join(shipped) or 'none'}")
            self.model.yarn.set_windows(self.schedule.validation_windows, yarn=False)
            val_loss = self.validate()
            self.log_validation(val_loss)
            early_stopped = self.step < self.schedule.total
            model = None
            if self.tc.save_model and not early_stopped:
                model = self.save_model(val_loss)
                log(f"model written: {model} (sample.py and evaluate.py take it)")
        wall = time.perf_counter() - started
        return {"val_loss": val_loss, "train_time": self.train_time, "steps": self.step,
                "tokens": sum(self.schedule.at(s).tokens for s in range(self.step)),
                "wall_time": wall, "early_stopped": early_stopped,
                "model": None if model is None else str(model),
                "history": [list(entry) for entry in self.history]}

    def stop_on_signal(self, signum):
        name = signal.Signals(signum).name
        if self.tc.save_on_interrupt:
            path = self.write_checkpoint()
            self.logger.print(f"{name} after step {self.step}: checkpoint saved to {path}; "
                              f"continue with --resume {path}")
        else:
            self.logger.print(f"{name} after step {self.step}: stopped (save_on_interrupt is "
                              "off)")
        raise Interrupted(signum)

    def log_step(self, loss, step_time):
        plan = self.schedule.at(self.step - 1)
        message = (f"step {self.step}/{self.schedule.total} loss {loss:.4f} "
                   f"lr {plan.lr_factor:.3f} tok/s {plan.tokens / step_time:,.0f} "
                   f"step {step_time * 1000:.0f}ms time {self.train_time:.1f}s")
        metrics = {"train/loss": loss, "train/lr_factor": plan.lr_factor,
                   "train/tokens_per_s": plan.tokens / step_time,
                   "train/step_ms": step_time * 1000}
        mfu = self.mfu(plan, step_time)
        if mfu is not None:
            message += f" mfu {mfu:.1%}"
            metrics["train/mfu"] = mfu
        self.logger.step(self.step, message, metrics)

    def flops_per_step(self, plan: StepPlan):
        """Training FLOPs of a step of ``plan``."""
        if plan.windows not in self._flops:
            self._flops[plan.windows] = self.model.flops_per_token(
                self.schedule.micro_batch_tokens, plan.windows)
        return self._flops[plan.windows] * plan.tokens

    def mfu(self, plan: StepPlan, seconds: float):
        """Model FLOPs utilisation per GPU of a step that took ``seconds``; None where the
        device's peak is unknown."""
        peak = self.device.peak_tflops
        if not peak:
            return None
        return self.flops_per_step(plan) / seconds / (peak * 1e12 * self.world.world_size)

    def log_validation(self, val_loss):
        self.history.append((self.step, self.train_time, val_loss))
        self.logger.print(f"step {self.step}/{self.schedule.total} val_loss {val_loss:.4f} "
                          f"train_time {self.train_time:.1f}s")
        if self.logger.wandb is not None:
            self.logger.wandb.log({"val/loss": val_loss, "train_time": self.train_time},
                                  step=self.step)


def validation_context(model_config, schedule: Schedule) -> int:
    """Context tokens before each scored piece of a validation chunk: the model's receptive
    field at the largest windows validation runs with, in whole attention blocks."""
    windows = [schedule.validation_windows, *(stage.windows for stage in schedule.stages_table)]
    largest = tuple(max(w[i] for w in windows) for i in range(2))
    block = model_config.block_size
    return -(-model_config.receptive_field(largest) // block) * block


def validation_fits(chunk_tokens: int, micro_batch_tokens: int, context_tokens: int) -> bool:
    """Whether a validation chunk goes to the model in micro-batches: whole, or in pieces each
    behind its context and still scoring some tokens."""
    return chunk_tokens <= micro_batch_tokens or context_tokens < micro_batch_tokens


def synchronize(device):
    if device.kind == "cuda":
        torch.cuda.synchronize()
