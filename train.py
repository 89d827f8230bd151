"""Training: the TrainingManager loop, validation, checkpoints and logs.

The schedule (schedule.py) says what holds at each step; ``TrainingManager.apply`` is the one
place where the model and the optimizer are put in that state.

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
from layers.sampled import CandidateSampler, mark_set_size_dynamic
from model import build_model, model_config
from optimizers import build_optimizer
from schedule import Schedule, StepPlan
from updates import sum_rows
from utils import ConfigError, check_ranges, repo_path


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
    # the micro-batch's unit, and the longest segment (document head) of a stage that names
    # none (a stage's own may be longer, up to the micro-batch)
    max_seq_len: int
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
    # the n-gram table's gradient kept as (row, gradient) pairs between its steps, no
    # table-sized gradient (layers/ngram.py RowGradients)
    ngram_row_grads: bool = False

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
        # read a step's loss only once the next step is queued: on CUDA, whose device runs
        # behind the host; the CPU computes as it is asked, and there reading late would only
        # move each step's time onto the step before it
        self.read_late = device.kind == "cuda"
        self.world = world or World()
        self.logger = logger
        seed_everything(self.tc.seed)
        torch_device = self.world.torch_device(device.kind)
        self.model = build_model(config.model).to(torch_device)
        # Every rank seeds alike; rank 0's weights make sure that they all start the same.
        self.world.broadcast_tensors([p.detach() for p in self.model.parameters()])
        self.optimizer = build_optimizer(self.model, config.optimizer, self.world)
        self.table_grads = self.model.grads_in_place() if self.tc.table_grads_in_place else []
        self.warmup_phases = []  # (name, seconds) of the last warm-up
        self.row_grads = (self.model.bigram.row_gradients(
            self.schedule.rows_between_table_steps()) if self.tc.ngram_row_grads else None)
        self.compiled = (self.model.compiled_forward() if config.compile.enabled
                         else self.model)
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
        # [the loss weights of the tokens ahead..., of the prefix token], set by apply(), a
        # buffer for each number of tokens ahead a stage weighs: the loss graph of a stage
        # computes only the targets it weighs (loss_graph). Validation scores the next token.
        widths = {1, *(len(stage.mtp_weights) for stage in self.schedule.stages_table)}
        self.loss_weights = {k: torch.zeros(k + 1, device=torch_device) for k in widths}
        self.val_weights = torch.tensor([1.0, 0.0], device=torch_device)
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
        self._mark = 0.0  # when the last step counted ended (finish_step)
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
        weights = torch.tensor([*plan.mtp_weights, plan.prefix_weight])
        if self.device.kind == "cuda":  # pinned: a copy from pageable memory may wait for it
            weights = weights.pin_memory()
        self.loss_weights[len(plan.mtp_weights)].copy_(weights, non_blocking=True)

    # -- one step -----------------------------------------------------------------------------

    def train_step(self):
        """One optimizer step of the schedule; returns the mean loss over all ranks as a
        device tensor."""
        plan = self.schedule.at(self.step)
        self.apply(plan)
        loss = self.accumulate(plan)
        self.model.refresh_float8_scales()
        self.optimizer_step(plan)
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
            docs = document_ids(inputs, self.schedule.config.attention_segment_cap)
            if self.row_grads is not None:
                self.row_grads.append(inputs)
            loss = self.compiled(inputs, targets, docs, self.loss_weights[len(plan.mtp_weights)],
                                 sets, plan.prefix)
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
        return mark_set_size_dynamic(self.sampler.build(targets.view(per_batch, rows),
                                                        plan.candidates, first))

    def optimizer_step(self, plan: StepPlan):
        """The optimizer's step on the accumulated gradients as ``plan`` asks: without Adam it
        steps the matrix group alone and keeps the Adam gradients for the next step
        (schedule.adam_every); without the tables it keeps theirs (schedule.table_adam_every)."""
        collect_table_grads(self.table_grads)
        self.model.tie.fold_grad()
        if self.tc.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip_norm)
        self.optimizer.step(plan.adam, plan.tables, plan.table_pace)
        if plan.adam:
            self.model.tie.sync()
        self.optimizer.zero_grad(plan.adam, plan.tables)

    def validate(self):
        """The mean next-token loss over the validation tokens (``validation_pieces``); each
        rank scores as many, its share of them.

        Compiled, it runs the training graph (grad mode on, no backward pass): a graph for
        no_grad would be a second compile, for a pass that the train time does not count."""
        with torch.set_grad_enabled(self.compiled is not self.model):
            # each piece's loss is its scored rows' sum over all its rows
            total = sum(self.compiled(inputs, targets, document_ids(inputs), self.val_weights,
                                      None, False).detach() * inputs.numel()
                        for inputs, targets in self.val_pieces)
        scored = self.val_tokens // self.world.world_size
        return self.world.all_reduce_mean(total / scored).item()

    # -- compile warm-up ------------------------------------------------------------------------

    def warmup(self):
        """Compile the graphs the run uses (the model's trunk and its loss graphs, which
        validation shares, and the optimizer's updates, the tables' at each of their paces)
        with the first steps on real batches, up to one with an Adam update, then restore
        weights, optimizer, data position, gradients and RNG: the timed run starts from
        exactly the state it would have had without warm-up. Returns seconds spent;
        ``warmup_phases`` says where they went (``warmup_summary``)."""
        start = time.perf_counter()
        # the snapshot waits in host memory: on the GPU it would add the weights and the
        # optimizer's state (7.3 GB for config/record89.py) to the peak of the warm-up's steps
        model_state = checkpoints.to_host(self.model.state_dict())
        optimizer_state = checkpoints.to_host(self.optimizer.state_dict())
        loader_state = self.train_loader.state_dict()
        rng = checkpoints.rng_state()
        sampler_state = self.sampler.state_dict() if self.sampler else None
        pending = {p: p.grad for p in self.model.parameters()}
        pending_rows = self.pending_rows()
        self.optimizer.zero_grad()
        step = self.step
        self.step = 0
        self.warmup_phases.clear()
        mark = time.perf_counter()

        def phase(name):
            nonlocal mark
            synchronize(self.device)
            now = time.perf_counter()
            self.warmup_phases.append((name, now - mark))
            mark = now

        every = self.schedule.config.adam_every
        for i in range(every):  # a step with Adam's update too
            self.train_step()
            phase("first step" if i == 0 else "Adam's step")
        # the embedding tables' Adam at each other pace the run takes (schedule.table_adam_every:
        # the compiled update holds the betas, raised to the pace, as constants)
        plans = [self.schedule.at(s) for s in range(self.schedule.total)]
        paces = {p.table_pace for p in plans if p.adam and p.tables}
        for pace in sorted(paces - {p.table_pace for p in plans[:every] if p.adam and p.tables}):
            plan = replace(plans[0], accumulation=1, adam=True, tables=True, table_pace=pace)
            self.accumulate(plan)
            self.optimizer_step(plan)
            phase(f"the tables' Adam at pace {pace}")
        # each other loss graph of the run and validation's: one for each set of targets the
        # stages weigh, over the full softmax and over the sampled one, run at every set size
        # the run takes (one graph serves them all: mark_set_size_dynamic)
        graphs = {loss_graph(p): p for p in reversed(plans)}
        validation = replace(plans[0], mtp_weights=(1.0,), prefix=False, candidates=0)
        graphs.setdefault(loss_graph(validation), validation)
        for key in sorted(graphs.keys() - {loss_graph(p) for p in plans[:every]}):
            self.accumulate(replace(graphs[key], accumulation=1))
            self.optimizer.zero_grad()
            phase(loss_graph_name(*key))
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)
        for p, grad in pending.items():
            p.grad = grad
        self.load_pending_rows(pending_rows)
        self.train_loader.load_state_dict(loader_state)
        checkpoints.set_rng_state(rng)
        if self.sampler:
            self.sampler.load_state_dict(sampler_state)
        self.step = step
        synchronize(self.device)
        return time.perf_counter() - start

    def warmup_summary(self) -> str:
        """The warm-up's phases and their seconds: the first step compiles the model's trunk,
        its first loss graph and the matrix updates; the others a graph each."""
        return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.warmup_phases)

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
                "gradients": pending, "row_gradients": self.pending_rows(),
                "optimizer": self.optimizer.state_dict(),
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

    def pending_rows(self) -> dict:
        """The n-gram table's row gradients waiting for its step, summed per row (the mean
        over the ranks, as the dense gradients in a checkpoint), in host memory: {"rows",
        "grads"}, or none."""
        if self.row_grads is None or not self.row_grads.used:
            return {}
        ((ids, grads, ranks),) = self.optimizer.held_rows().values()
        rows, summed = sum_rows(ids, grads, ranks)
        return checkpoints.to_host({"rows": rows, "grads": summed})

    def load_pending_rows(self, pending: dict) -> None:
        if self.row_grads is not None:
            self.row_grads.clear()
            if pending:
                self.row_grads.load(pending["rows"].to(self.row_grads.ids.device),
                                    pending["grads"].to(self.row_grads.grads.device))

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
        self.load_pending_rows(state.get("row_gradients", {}))
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
                # With ``read_late`` a step's loss is read once the next step is queued
                # (``pending``), so that the device never waits for the host between steps; a
                # pause (checkpoint, validation, the end) reads it at once and waits for the
                # device.
                pending, self._mark = None, time.perf_counter()
                while self.step < stop and signals.received is None:
                    loss = self.train_step()
                    if self.read_late and loss.is_cuda:
                        loss = HostCopy(loss)
                    if self.tail_ships is not None:
                        self.tail_ships.tick(self.step - 1)
                    if pending is not None:
                        self.finish_step(*pending)
                        pending = None
                    checkpoint = (self.tc.checkpoint_every
                                  and self.step % self.tc.checkpoint_every == 0)
                    validation = (every and self.step % every == 0 and self.step < stop
                                  and signals.received is None)
                    pause = bool(checkpoint or validation)
                    if self.read_late and not pause:
                        pending = (self.step, loss)
                        continue
                    self.finish_step(self.step, loss, pause=pause)
                    if not pause:
                        continue
                    if checkpoint:
                        log(f"checkpoint written: {self.write_checkpoint()}")
                    if validation:
                        self.log_validation(self.validate())
                    self._mark = time.perf_counter()  # neither is train time
                if pending is not None:
                    self.finish_step(*pending, pause=True)
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

    def finish_step(self, step: int, loss, pause: bool = False) -> None:
        """Read step ``step``'s loss (a tensor, or a ``HostCopy`` of one read late: then it
        waits for that step's work only), count the time since the previous step's end as its
        time, check and log it. With ``pause`` wait for the device to finish everything queued
        first."""
        loss = loss.item()
        if pause:
            synchronize(self.device)
        now = time.perf_counter()
        step_time, self._mark = now - self._mark, now
        self.train_time += step_time
        if not math.isfinite(loss):
            raise TrainingError(f"loss is {loss} at step {step}: training stopped (log kept "
                                f"at {self.logger.path})")
        self.log_step(step, loss, step_time)

    def log_step(self, step, loss, step_time):
        plan = self.schedule.at(step - 1)
        message = (f"step {step}/{self.schedule.total} loss {loss:.4f} "
                   f"lr {plan.lr_factor:.3f} tok/s {plan.tokens / step_time:,.0f} "
                   f"step {step_time * 1000:.0f}ms time {self.train_time:.1f}s")
        metrics = {"train/loss": loss, "train/lr_factor": plan.lr_factor,
                   "train/tokens_per_s": plan.tokens / step_time,
                   "train/step_ms": step_time * 1000}
        mfu = self.mfu(plan, step_time)
        if mfu is not None:
            message += f" mfu {mfu:.1%}"
            metrics["train/mfu"] = mfu
        self.logger.step(step, message, metrics)

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


def loss_graph(plan: StepPlan) -> tuple:
    """What tells a step's loss graph from another's: the tokens ahead its stage weighs, the
    prefix token's target, and the sampled softmax's set size (0: the full softmax)."""
    return len(plan.mtp_weights), plan.prefix, plan.candidates


def loss_graph_name(ahead: int, prefix: bool, candidates: int) -> str:
    over = f"over {candidates} candidates" if candidates else "full softmax"
    return f"loss of {ahead} token{'s' * (ahead > 1)} ahead{' and the prefix' * prefix}, {over}"


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


class HostCopy:
    """A CUDA scalar copied to pinned host memory behind the work queued so far: ``item`` waits
    for that work only. ``Tensor.item`` would wait for all work queued, the next step's too, and
    the device would idle while the host queues the step after (README, Training)."""

    def __init__(self, value: torch.Tensor):
        self.host = torch.empty((), dtype=value.dtype, pin_memory=True)
        self.host.copy_(value, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record()

    def item(self) -> float:
        self.ready.synchronize()
        return self.host.item()


def synchronize(device):
    if device.kind == "cuda":
        torch.cuda.synchronize()
