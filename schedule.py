"""The schedule: one table of stages, a row each (as the speedrun's ``TRAINING_STAGES``), and
the curves that run across it.

``Schedule.at(step)`` answers what holds at a step: tokens, windows, learning rate, momentum,
loss weights, whether the embedding is untied, whether a stage begins. It is a pure function
of the step, so a resumed run recomputes exactly what an uninterrupted one would;
``train.TrainingManager.apply`` is the one place where the model and the optimizer are put in
that state.
"""

import math
from dataclasses import dataclass

from utils import ConfigError, build_section, check_ranges


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
    # 0: the prefix weight moves linearly; n: in n equal steps, each held for an n-th of the
    # stage (record #92: 0.20, 0.15, 0.10, 0.05 towards 0 over its second stage)
    prefix_weight_levels: int = 0

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
        if not isinstance(self.prefix_weight_levels, int) or self.prefix_weight_levels < 0:
            raise ConfigError(f"schedule.stages: prefix_weight_levels must be an int >= 0, got "
                              f"{self.prefix_weight_levels!r}")
        if self.prefix_weight_levels and self.prefix_weight_end is None:
            raise ConfigError("schedule.stages: prefix_weight_levels steps the prefix weight "
                              "towards prefix_weight_end: give that too")


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
    # the first untied step itself, which may fall in the extension (record #92: 1176 of 1194);
    # None: split_frac of the scheduled iterations
    untie_step: int | None = None
    # the embedding tables' Adam (optimizers.TABLE_LABELS) on every n-th step from step
    # table_adam_from on, with the gradients of the n summed, each update standing for
    # n / adam_every of Adam's (record #92: 4 from step 336); 0: with the other Adam parameters
    table_adam_every: int = 0
    table_adam_from: int = 0
    # training attends within segments of at most this many tokens of a document (record #92:
    # 2560, its documents up to 3072 long); validation within whole documents; 0: no cap
    attention_segment_cap: int = 0
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
                                   "tail_average_window", "bank_blend_window",
                                   "table_adam_every", "table_adam_from",
                                   "attention_segment_cap"),
                     fractions=("cooldown_frac", "split_frac", "tail_ema_blend", "bank_blend",
                                "bank_blend_correction"),
                     below_one=("momentum_start", "momentum_peak", "momentum_end"))
        total = self.num_scheduled_iterations + self.num_extension_iterations
        for key in ("tail_ema_window", "tail_average_window", "bank_blend_window"):
            if getattr(self, key) > total:
                raise ConfigError(f"schedule.{key}={getattr(self, key)} is longer than the "
                                  f"run's {total} steps")
        if self.untie_step is not None and not (
                isinstance(self.untie_step, int) and 0 <= self.untie_step <= total):
            raise ConfigError(f"schedule.untie_step must be None or a step from 0 to the run's "
                              f"{total} ({total}: never untied), got {self.untie_step!r}")
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
        if self.table_adam_every and (self.table_adam_every % self.adam_every
                                      or self.table_adam_every <= self.adam_every):
            raise ConfigError(f"schedule.table_adam_every ({self.table_adam_every}) must be a "
                              f"multiple of adam_every ({self.adam_every}) above it, or 0")
        if self.table_adam_every and self.table_adam_from % self.table_adam_every:
            raise ConfigError(f"schedule.table_adam_from ({self.table_adam_from}) must be a "
                              f"multiple of table_adam_every ({self.table_adam_every}): the "
                              f"tables' first period starts there")
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
    prefix: bool  # the stage weighs the prefix token at some step (its loss has the target)
    lr_factor: float  # times each group's lr
    momentum: float  # of the matrix optimizer
    adam: bool  # Adam steps after this step's gradients
    untied: bool  # the embedding trains apart from the lm_head from this step on
    transition: bool  # a stage with other tokens or windows begins: the scalars freeze
    candidates: int = 0  # the sampled softmax's candidates per set (0: the full softmax)
    tables: bool = True  # the embedding tables' Adam steps with this step's (if adam)
    table_pace: int = 1  # how many of Adam's steps the tables' update stands for


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
        self.untie_step = (round(config.split_frac * self.scheduled)
                           if config.untie_step is None else config.untie_step)
        self.validation_windows = config.validation_windows
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
            if (stage.max_seq_len is not None
                    and not 1 <= stage.max_seq_len <= self.micro_batch_tokens):
                raise ConfigError(f"schedule.stages: max_seq_len {stage.max_seq_len} must be "
                                  f"between 1 and {self.describe_round()}")
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

    def rows_between_table_steps(self) -> int:
        """The n-gram table's looked-up rows (two a token) a process holds at most between two
        of the tables' steps: its share of the largest step's tokens, for as many steps."""
        c = self.config
        steps = max(c.adam_every, c.table_adam_every)
        return 2 * max(s.tokens for s in self.stages_table) // self.world_size * steps

    def at(self, step) -> StepPlan:
        index = self.stage_of(step)
        stage = self.stages_table[index]
        before = self.stages_table[index - 1] if index else stage
        transition = (step == self.starts[index] and index > 0
                      and (stage.tokens, stage.windows) != (before.tokens, before.windows))
        end = self.starts[index + 1] if index + 1 < len(self.starts) else self.total
        along = (step - self.starts[index]) / (end - self.starts[index])  # [0, 1) in the stage

        def moved(start, finish, levels=0):
            if finish is None:
                return start
            return start + (finish - start) * (math.floor(levels * along) / levels if levels
                                               else along)

        mtp_end = stage.mtp_weights_end or (None,) * len(stage.mtp_weights)
        return StepPlan(step=step, stage=index, tokens=stage.tokens,
                        accumulation=stage.tokens // self.round_tokens, windows=stage.windows,
                        max_seq_len=stage.max_seq_len or self.seq,
                        mtp_weights=tuple(moved(a, b) for a, b in zip(stage.mtp_weights, mtp_end,
                                                                      strict=True)),
                        prefix_weight=moved(stage.prefix_weight, stage.prefix_weight_end,
                                            stage.prefix_weight_levels),
                        prefix=max(stage.prefix_weight, stage.prefix_weight_end or 0.0) > 0,
                        lr_factor=self._lr_factor(step, stage.lr_mul),
                        momentum=self._momentum(step),
                        adam=(step + 1) % self.config.adam_every == 0,
                        untied=step >= self.untie_step, transition=transition,
                        candidates=self._candidates(step), **self._tables(step))

    def _tables(self, step):
        c = self.config
        if not c.table_adam_every or step < c.table_adam_from:
            return dict(tables=True, table_pace=1)
        return dict(tables=(step + 1) % c.table_adam_every == 0,
                    table_pace=c.table_adam_every // c.adam_every)

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
