"""Optimizers for the speedrun trainer: Adam, a matrix optimizer and a scalar Adam.

Every parameter carries ``.label`` and optionally ``.lr_mul`` / ``.wd_mul`` (default 1.0).
``LABEL_GROUPS`` maps each label to one of three groups:

* ``"adam"``: token embedding, lm_head and value embeddings, trained by Adam;
* ``"matrix"``: the transformer blocks' weights, trained by NorMuon, BAM, ARO-Sinkhorn or ANVIL.
  A parameter with ndim >= 2 is a batch of matrices over its leading dims, so the merged QKVO
  weight (4, hdim, dim) is four matrices, each orthogonalised on its own; a parameter's
  ``.matrix_shape`` (rows, cols) cuts it into smaller ones (record #89's Q and K per head pair);
* ``"scalar"``: lambdas, skip weights and small gate weights, trained by a separate Adam that
  the trainer can freeze for a few steps.

``build_optimizer(model_or_named_params, OptimizerConfig, world)`` returns one ``Optimizers``
object. With several ranks (``distributed.World``) it also reduces the gradients: the matrix
optimizer's by reduce-scatter, so each rank orthogonalises only its share of the matrices and
all-gathers the new weights; Adam's by all-reduce. In a world of one there is no collective.

optimizer_config keys, with record #89's values (config/record89.py; config/base.py takes ANVIL):

==================  ==========================================================================
matrix_optimizer    "normuon" | "bam" | "aro" | "anvil"                             "normuon"
adam                lr, betas, eps, weight_decay of the "adam" group
                    0.008, (0.5, 0.95), 1e-10, 0.005
scalar_adam         the same keys for the "scalar" group       0.008, (0.9, 0.99), 1e-10, 0.005
normuon             lr, momentum, beta2, weight_decay                     0.023, 0.95, 0.9, 1.2
bam                 lr, momentum, weight_decay                                0.023, 0.95, 1.2
aro                 lr, momentum, weight_decay, sinkhorn_iters, rms     0.004, 0.95, 40, 5, 0.2
anvil               lr, momentum, beta2, weight_decay, slow_beta, fast_beta, fast_weight,
                    engage_step          0.023, 0.95, 0.9, 2.25, 0.98, 0.85, 0.4385, 514
label_lr_mul        label -> lr multiplier (a missing label means 1.0)
label_wd_mul        label -> weight-decay multiplier (a missing label means 1.0)
label_betas         label -> Adam betas replacing its group's ``betas``
==================  ==========================================================================

With f the trainer's schedule factor (``Optimizers.set_lr_factor``), a parameter's
lr_eff = lr * f * label_lr_mul[label] * p.lr_mul (times max(1, rows/cols) ** 0.5 for NorMuon,
BAM and ANVIL) and wd_eff = weight_decay * label_wd_mul[label] * p.wd_mul. Weight decay is cautious
(applied only where the update and the weight agree in sign) and carries two lr factors, as in
modded-nanogpt: Adam decays a weight by wd_eff * lr_eff ** 2, the matrix optimizers by
wd_eff * (lr * f) * lr_eff. The matrix momentum is set by the trainer (``set_momentum``);
the speedrun warms it up from 0.85 to 0.95 and cools it back down to 0.85 at the end.

The embedding tables (``TABLE_LABELS``) may step less often than the other Adam parameters
(record #92: every fourth step where Adam steps every other): ``step(tables=False)`` leaves
them and their gradients to accumulate, and ``step(table_pace=k)`` makes their update stand for
k of theirs (betas to the k-th power, decay times k).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from distributed import World
from updates import (
    adam_rows_,
    adam_step_,
    compiled_adam_step_,
    compiled_matrix_step_,
    device_scalars,
    matrix_step_,
)
from utils import ConfigError, build_section, check_ranges

# the embedding tables, which the schedule may step at their own pace (schedule.table_adam_every)
TABLE_LABELS = ("value_embed", "bigram_embed")

LABEL_GROUPS: dict[str, str] = {
    "embed": "adam",
    "lm_head": "adam",
    "value_embed": "adam",
    "bigram_embed": "adam",
    "attn": "matrix",
    "mlp": "matrix",
    "scalar": "scalar",
    "resid_lambda": "scalar",
    "post_lambda": "scalar",
    "gate": "scalar",
    "mudd": "scalar",
    "mudd_gate": "scalar",
}
MATRIX_OPTIMIZERS = ("normuon", "bam", "aro", "anvil")


# -----------------------------------------------------------------------------------------
# optimizer_config, typed


@dataclass(frozen=True)
class AdamConfig:
    lr: float
    betas: tuple
    eps: float
    weight_decay: float


@dataclass(frozen=True)
class NorMuonConfig:
    lr: float
    momentum: float
    beta2: float
    weight_decay: float


@dataclass(frozen=True)
class BamConfig:
    lr: float
    momentum: float
    weight_decay: float


@dataclass(frozen=True)
class AroConfig:
    lr: float
    momentum: float
    weight_decay: float
    sinkhorn_iters: int
    rms: float


@dataclass(frozen=True)
class AnvilConfig:
    lr: float
    momentum: float
    beta2: float
    weight_decay: float
    slow_beta: float  # the slow rail's EMA
    fast_beta: float  # the fast rail's EMA once engaged (before: the momentum)
    fast_weight: float  # the fast rail's share of the blend once engaged (before: 1)
    engage_step: int  # the schedule's step from which the rails blend


def _build_hyperparameters(cls, name: str, values):
    """One optimizer's section, its keys, types and ranges checked."""
    config = build_section(cls, name, values)
    check_ranges(name, config,
                 positive=[k for k in ("eps", "sinkhorn_iters", "rms") if hasattr(config, k)],
                 non_negative=[k for k in ("lr", "weight_decay", "engage_step")
                               if hasattr(config, k)],
                 below_one=[k for k in ("momentum", "beta2", "slow_beta", "fast_beta")
                            if hasattr(config, k)],
                 fractions=[k for k in ("fast_weight",) if hasattr(config, k)])
    betas = getattr(config, "betas", (0.0, 0.0))
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"{name}.betas must be two numbers in [0, 1), got {betas}")
    return config


_MATRIX_CONFIGS = {"normuon": NorMuonConfig, "bam": BamConfig, "aro": AroConfig,
                   "anvil": AnvilConfig}


@dataclass(frozen=True)
class OptimizerConfig:
    """``optimizer_config``. The sections of the matrix optimizers not chosen are optional."""

    matrix_optimizer: str
    adam: AdamConfig
    scalar_adam: AdamConfig
    matrix: NorMuonConfig | BamConfig | AroConfig | AnvilConfig  # the chosen one's section
    label_lr_mul: dict
    label_wd_mul: dict
    label_betas: dict

    @classmethod
    def from_dict(cls, values: dict) -> OptimizerConfig:
        name = "optimizer_config"
        allowed = {"matrix_optimizer", "adam", "scalar_adam", *MATRIX_OPTIMIZERS,
                   "label_lr_mul", "label_wd_mul", "label_betas"}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ConfigError(f"{name}: unknown keys {unknown}")
        method = values.get("matrix_optimizer")
        if method not in MATRIX_OPTIMIZERS:
            raise ConfigError(f"{name}.matrix_optimizer must be one of {MATRIX_OPTIMIZERS}, "
                              f"got {method!r}")
        for section in ("adam", "scalar_adam", method):
            if section not in values:
                raise ConfigError(f"{name} lacks the {section!r} section")
        labels = {}
        for key in ("label_lr_mul", "label_wd_mul", "label_betas"):
            labels[key] = dict(values.get(key, {}))
            unknown = sorted(set(labels[key]) - set(LABEL_GROUPS))
            if unknown:
                raise ConfigError(f"{name}.{key} has unknown labels {unknown}")
        matrix_betas = [k for k in labels["label_betas"] if LABEL_GROUPS[k] == "matrix"]
        if matrix_betas:
            raise ConfigError(f"{name}.label_betas applies to Adam labels only, got "
                              f"{matrix_betas}")
        for other in set(MATRIX_OPTIMIZERS) - {method}:
            if other in values:  # unused here, but a later --matrix_optimizer may pick it
                _build_hyperparameters(_MATRIX_CONFIGS[other], f"{name}.{other}",
                                       values[other])
        return cls(method,
                   _build_hyperparameters(AdamConfig, f"{name}.adam", values["adam"]),
                   _build_hyperparameters(AdamConfig, f"{name}.scalar_adam",
                                          values["scalar_adam"]),
                   _build_hyperparameters(_MATRIX_CONFIGS[method], f"{name}.{method}",
                                          values[method]),
                   **labels)


# -----------------------------------------------------------------------------------------
# The three groups


def matrix_shape(param: Tensor) -> tuple[int, int]:
    """The (rows, cols) of the matrices the matrix optimizer sees in ``param``."""
    return tuple(getattr(param, "matrix_shape", param.shape[-2:]))


@dataclass(eq=False)
class _Entry:
    name: str
    param: nn.Parameter
    label: str
    group: str
    lr_mul: float  # label_lr_mul[label] * p.lr_mul
    wd_mul: float  # label_wd_mul[label] * p.wd_mul
    state: dict


class _AdamGroup:
    """Adam over a group's parameters. ``one_call``: all of them in one (compiled) call, for
    the scalar group, whose cost is kernel launches, not bytes. Otherwise one call a
    parameter: the tables share one graph however many of them have gradients (the embedding
    has none while it is tied), where a call over a list would compile again at the untie."""

    def __init__(self, hp: dict, label_betas: dict, one_call: bool = False):
        self.hp = hp
        self.label_betas = label_betas
        self.one_call = one_call
        self.entries: list[_Entry] = []

    def init_state(self, p: Tensor) -> dict:
        if getattr(p, "row_adam", False):  # no momentum, a second moment a row
            return dict(step=0, exp_avg=p.new_zeros(0, dtype=torch.float32),
                        exp_avg_sq=p.new_zeros(p.size(0), 1, dtype=torch.float32))
        zeros = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return dict(step=0, exp_avg=zeros, exp_avg_sq=zeros.clone())

    @torch.no_grad()
    def step(self, lr_factor: float, held: tuple = (), pace: dict | None = None,
             row_grads: dict | None = None) -> None:
        """Adam on the parameters with gradients, but those labelled in ``held``; a label in
        ``pace`` (label -> k) steps as k steps at once: betas ** k, decay times k.
        ``row_grads``: {entry: (row ids, gradient rows, ranks)} of parameters whose gradient is
        kept as rows (the n-gram table's, ``layers.ngram.RowGradients``): a row's gradient is
        the sum of its pairs / ranks."""
        row_grads = row_grads or {}
        entries = [e for e in self.entries if (e.param.grad is not None or e in row_grads)
                   and e.label not in held]
        if not entries:
            return
        betas, step_sizes, decays = [], [], []
        for e in entries:
            k = (pace or {}).get(e.label, 1)
            beta1, beta2 = (b**k for b in self.label_betas.get(e.label, self.hp["betas"]))
            if not e.state["exp_avg"].numel():
                beta1 = 0.0  # row-wise: no momentum, whatever the label's betas
            betas.append((beta1, beta2))
            e.state["step"] += 1
            t = e.state["step"]
            lr = self.hp["lr"] * lr_factor * e.lr_mul
            step_sizes.append(lr * math.sqrt(1 - beta2**t) / (1 - beta1**t))
            decays.append(self.hp["weight_decay"] * e.wd_mul * k * lr * lr)
        for i, e in enumerate(entries):
            if e in row_grads:
                ids, grads, ranks = row_grads[e]
                adam_rows_(e.param, ids, grads, e.state["exp_avg_sq"], betas[i][1],
                           self.hp["eps"], step_sizes[i], decays[i], ranks)
        keep = [i for i, e in enumerate(entries) if e not in row_grads]
        entries, betas = [entries[i] for i in keep], [betas[i] for i in keep]
        step_sizes, decays = [step_sizes[i] for i in keep], [decays[i] for i in keep]
        if not entries:
            return
        n, cuda = len(entries), entries[0].param.is_cuda
        for lo, hi in [(0, n)] if self.one_call else [(i, i + 1) for i in range(n)]:
            part = entries[lo:hi]
            sizes, decay, update = step_sizes[lo:hi], decays[lo:hi], adam_step_
            if cuda:
                values = device_scalars(sizes + decay, part[0].param.device)
                sizes, decay, update = values[: hi - lo], values[hi - lo:], compiled_adam_step_
            update([e.param for e in part], [e.param.grad for e in part],
                   [e.state["exp_avg"] for e in part], [e.state["exp_avg_sq"] for e in part],
                   betas[lo:hi], self.hp["eps"], sizes, decay)


class _Stack:
    """The K matrices of one shape group, stacked (K, rows, cols), and this rank's share.

    Rank r steps the matrices ``lo:hi``, a contiguous run of at most ``per_rank`` =
    ceil(K / world_size); the last ranks' shares may be short or empty. Collectives need equal
    shares, so the stack is padded to ``per_rank * world_size`` matrices on the wire. In a world
    of one the share is the whole stack.
    """

    def __init__(self, entries: list[_Entry], world: World):
        self.entries = entries
        self.world = world
        self.rows, self.cols = matrix_shape(entries[0].param)
        self.views = [e.param.view(-1, self.rows, self.cols) for e in entries]
        self.counts = [v.size(0) for v in self.views]
        self.size = sum(self.counts)
        self.per_rank = -(-self.size // world.world_size)
        self.lo = min(self.size, world.rank * self.per_rank)
        self.hi = min(self.size, self.lo + self.per_rank)
        # (entry index, start, stop) of the entries' matrices that fall in lo:hi
        self.pieces = []
        offset = 0
        for i, count in enumerate(self.counts):
            start, stop = max(self.lo - offset, 0), min(self.hi - offset, count)
            if start < stop:
                self.pieces.append((i, start, stop))
            offset += count

    def pieces_of(self, tensors: list[Tensor]) -> list[Tensor]:
        """Views of this rank's matrices in per-entry tensors (leading dim: the entry's
        count); in a world of one, the whole tensors."""
        return [tensors[i][start:stop] for i, start, stop in self.pieces]

    def share(self, tensors: list[Tensor]) -> Tensor:
        """This rank's matrices of per-entry tensors, stacked (a copy)."""
        if not self.pieces:
            return tensors[0][:0]
        return torch.cat(self.pieces_of(tensors))

    def write_all(self, tensors: list[Tensor], stacked: Tensor) -> None:
        """Copy a stack of (at least) all K matrices into the per-entry tensors."""
        torch._foreach_copy_(tensors, list(stacked[: self.size].split(self.counts)))


class _StackStep:
    """One shape group's matrix step, in three calls so that collectives overlap other work.

    ``__init__`` (with several ranks) stacks the gradients and starts their reduce-scatter;
    ``update`` steps this rank's share in place (and, with several ranks, starts the
    all-gather of the new weights); ``finish`` writes the gathered weights into the parameters.
    """

    def __init__(self, group: _MatrixGroup, stack: _Stack):
        self.group, self.stack = group, stack
        self.grads = [e.param.grad.view(-1, stack.rows, stack.cols) for e in stack.entries]
        self.work = None  # the collective in flight, if any
        self.new = None  # with several ranks: the gathered new weights
        world = stack.world
        if world.distributed:
            reduced, self.work = world.start_reduce_scatter_mean(
                torch.cat(self.grads).float(), stack.per_rank)
            self.grads = [reduced[: stack.hi - stack.lo]]  # the padding is not stepped

    def update(self, lr_factor: float, momentum: float, step: int) -> None:
        stack = self.stack
        if self.work is not None:
            self.work.wait()
        if stack.pieces:  # an empty share has nothing to step
            state = {key: stack.pieces_of([e.state[key] for e in stack.entries])
                     for key in stack.entries[0].state}
            self.group.update(stack, stack.pieces_of(stack.views), self.grads, state,
                              lr_factor, momentum, step)
        if stack.world.distributed:
            self.new, self.work = stack.world.start_all_gather(stack.share(stack.views),
                                                               stack.per_rank)

    def finish(self) -> None:
        if self.work is None:
            return
        self.work.wait()
        self.stack.write_all(self.stack.views, self.new)


class _MatrixGroup:
    """The matrix optimizer. With several ranks, each steps only its share of every shape
    group's stack (reduce-scatter of the gradients, all-gather of the new weights, as in the
    speedrun). Every rank keeps full-size state tensors, but only its share of them is current:
    ``gather_state`` brings every rank's share everywhere."""

    def __init__(self, method: str, hp: dict, world: World):
        self.method = method
        self.hp = hp
        self.world = world
        self.entries: list[_Entry] = []
        self._multipliers: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}

    def init_state(self, p: Tensor) -> dict:
        rows, cols = matrix_shape(p)
        k = p.numel() // (rows * cols)
        f32 = dict(dtype=torch.float32, device=p.device)
        state = dict(momentum_buffer=torch.zeros(k, rows, cols, **f32))
        if self.method == "anvil":
            state["slow_buffer"] = torch.zeros(k, rows, cols, **f32)
        if self.method in ("normuon", "anvil"):
            shape = (k, rows, 1) if rows >= cols else (k, 1, cols)
            state["second_moment"] = torch.zeros(shape, **f32)
        elif self.method == "aro":
            side = min(rows, cols)
            state["rotation"] = torch.eye(side, **f32).expand(k, side, side).clone()
        return state

    def _stacks(self, entries: list[_Entry]) -> list[_Stack]:
        buckets: dict[tuple[int, int], list[_Entry]] = {}
        for e in entries:
            buckets.setdefault(matrix_shape(e.param), []).append(e)
        return [_Stack(bucket, self.world) for bucket in buckets.values()]

    def start(self) -> list[_StackStep]:
        """Stack the gradients by shape; with several ranks, start their reduce-scatters."""
        with_grads = [e for e in self.entries if e.param.grad is not None]
        if self.world.distributed and len(with_grads) < len(self.entries):
            # A rank's share is fixed by the stack's make-up, and so is which state it keeps.
            missing = [e.name for e in self.entries if e.param.grad is None]
            raise RuntimeError(f"matrix parameters {missing} have no gradient: with several "
                               "ranks every matrix parameter needs one at every step")
        return [_StackStep(self, stack) for stack in self._stacks(with_grads)]

    def gather_state(self) -> None:
        """Make every rank's state whole: each rank's share, all-gathered."""
        if not self.world.distributed:
            return
        for stack in self._stacks(self.entries):
            for key in stack.entries[0].state:
                tensors = [e.state[key] for e in stack.entries]
                stacked, work = self.world.start_all_gather(stack.share(tensors), stack.per_rank)
                work.wait()
                stack.write_all(tensors, stacked)

    def _per_matrix_multipliers(self, entries: list[_Entry], counts: list[int]):
        # Cached per set of parameters: one (K, 1, 1) lr_mul and wd_mul column per stack.
        key = tuple(id(e) for e in entries)
        if key not in self._multipliers:
            device = entries[0].param.device
            columns = []
            for attr in ("lr_mul", "wd_mul"):
                values = [
                    getattr(e, attr) for e, n in zip(entries, counts, strict=True) for _ in range(n)
                ]
                columns.append(torch.tensor(values, dtype=torch.float32, device=device))
            self._multipliers[key] = tuple(c.view(-1, 1, 1) for c in columns)
        return self._multipliers[key]

    def update(self, stack: _Stack, weights: list[Tensor], grads: list[Tensor],
               state: dict[str, list[Tensor]], lr_factor: float, momentum: float,
               step: int) -> None:
        """Step this rank's share of the stack in place: ``weights``, ``grads`` and ``state``
        are its pieces (``matrix_step_``); ``step`` is the schedule's (ANVIL's engage)."""
        lr_mul, wd_mul = self._per_matrix_multipliers(stack.entries, stack.counts)
        lr_mul, wd_mul = lr_mul[stack.lo:stack.hi], wd_mul[stack.lo:stack.hi]
        group_lr = self.hp["lr"] * lr_factor
        shape_factor = 1.0 if self.method == "aro" else max(1.0, stack.rows / stack.cols) ** 0.5
        scalars = [momentum, group_lr * shape_factor, self.hp["weight_decay"] * group_lr]
        rails = [momentum, 1.0]
        if self.method == "anvil" and step >= self.hp["engage_step"]:
            rails = [self.hp["fast_beta"], self.hp["fast_weight"]]
        run = matrix_step_
        # ARO stays eager: its QR checks its result on the host (qr_orthonormal).
        if lr_mul.is_cuda and self.method != "aro":
            run = compiled_matrix_step_
            scalars, rails = device_scalars(scalars + rails, lr_mul.device).split([3, 2])
        run(weights, grads, state, self.method, self.hp, *scalars, lr_mul, wd_mul, *rails)


# -----------------------------------------------------------------------------------------
# The object the trainer drives


def _copy_state(source: dict, fresh: dict) -> dict:
    """Deep copy of ``source`` shaped like ``fresh``; 2-D tensors may arrive transposed."""
    out = {}
    for key, target in fresh.items():
        value = source[key]
        if not isinstance(value, Tensor):
            out[key] = value
        elif value.shape == target.shape:
            out[key] = value.clone()
        elif value.ndim == 2 and value.mT.shape == target.shape:
            out[key] = value.mT.clone(memory_format=torch.contiguous_format)
        else:
            raise ValueError(
                f"cannot copy state {key!r} of shape {tuple(value.shape)} "
                f"into one of shape {tuple(target.shape)}"
            )
    return out


class Optimizers:
    """Adam + matrix optimizer + scalar Adam, stepped, zeroed and checkpointed as one.

    State is keyed by parameter name in a stable order (the order given), never by id(), so a
    checkpoint loads into a freshly built model and optimizer.
    """

    def __init__(self, named_params: Iterable, config: OptimizerConfig,
                 world: World | None = None):
        self.world = world or World()
        self.matrix_optimizer = config.matrix_optimizer
        self._label_lr_mul = config.label_lr_mul
        self._label_wd_mul = config.label_wd_mul
        self._groups = {
            "adam": _AdamGroup(asdict(config.adam), config.label_betas),
            "matrix": _MatrixGroup(self.matrix_optimizer, asdict(config.matrix), self.world),
            "scalar": _AdamGroup(asdict(config.scalar_adam), config.label_betas, one_call=True),
        }
        self._entries: list[_Entry] = []
        self._by_id: dict[int, _Entry] = {}
        self.lr_factor = 1.0
        self.momentum = float(config.matrix.momentum)
        self.schedule_step = 0  # the trainer's step (set_step)
        self.frozen_scalar_steps = 0
        for item in named_params:
            # A bare tensor would unpack along its first dim: insist on (name, param) pairs.
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError("expected (name, parameter) pairs, as model.named_parameters()")
            self._register(*item)

    def _register(self, name: str, param: nn.Parameter) -> _Entry:
        label = getattr(param, "label", None)
        if label not in LABEL_GROUPS:
            raise ValueError(
                f"parameter {name!r} has label {label!r}; known labels: {sorted(LABEL_GROUPS)}"
            )
        if id(param) in self._by_id:
            raise ValueError(f"parameter {name!r} is already in the optimizer")
        group = LABEL_GROUPS[label]
        if group == "matrix" and param.ndim < 2:
            raise ValueError(f"parameter {name!r} (label {label!r}) needs ndim >= 2")
        entry = _Entry(
            name=name,
            param=param,
            label=label,
            group=group,
            lr_mul=self._label_lr_mul.get(label, 1.0) * float(getattr(param, "lr_mul", 1.0)),
            wd_mul=self._label_wd_mul.get(label, 1.0) * float(getattr(param, "wd_mul", 1.0)),
            state=self._groups[group].init_state(param),
        )
        self._entries.append(entry)
        self._by_id[id(param)] = entry
        self._groups[group].entries.append(entry)
        return entry

    @torch.no_grad()
    def step(self, adam: bool = True, tables: bool = True, table_pace: int = 1) -> None:
        """Step all three groups; the scalar one only drops its grads while frozen. With
        ``adam`` off only the matrix group steps, and the Adam groups' gradients stay to be
        summed with the next steps' (``zero_grad(adam=False)`` keeps them): the record's Adam
        every other step. With ``tables`` off the embedding tables (``TABLE_LABELS``) keep
        theirs likewise (``zero_grad(tables=False)``); ``table_pace`` k makes their update
        stand for k (record #92: 2, its tables stepping every fourth step).

        With several ranks the gradients are the rank's own (the mean over its micro-batches);
        here they become the mean over all ranks. The collectives start first and each is
        waited for only where its result is needed: the matrix updates run while the Adam
        all-reduce is in flight, the Adam updates while the matrix all-gathers are.
        """
        frozen = self.frozen_scalar_steps > 0
        if frozen:
            self.frozen_scalar_steps -= 1
            for e in self._groups["scalar"].entries:
                e.param.grad = None
        held = () if tables else TABLE_LABELS
        stack_steps = self._groups["matrix"].start()
        reductions = self._all_reduce_adam_grads(held) if adam else []
        for stack_step in stack_steps:
            stack_step.update(self.lr_factor, self.momentum, self.schedule_step)
        for work in reductions:
            work.wait()
        if adam:
            self._groups["adam"].step(self.lr_factor, held,
                                      dict.fromkeys(TABLE_LABELS, table_pace),
                                      self.held_rows(held))
            if not frozen:
                self._groups["scalar"].step(self.lr_factor)
        for stack_step in stack_steps:
            stack_step.finish()

    def _all_reduce_adam_grads(self, held: tuple) -> list:
        """Start averaging the Adam groups' gradients over the ranks (none in a world of one),
        but those of the labels ``held`` for a later step."""
        if not self.world.distributed:
            return []
        grads = [
            e.param.grad
            for group in ("adam", "scalar")
            for e in self._groups[group].entries
            if e.param.grad is not None and e.label not in held
        ]
        return self.world.start_all_reduce_mean(grads)

    def held_rows(self, held: tuple = ()) -> dict:
        """{entry: (row ids, gradient rows, ranks)} of the parameters whose gradient is kept as
        rows (``row_grads``), but those of the labels ``held``: the pairs held since their
        last step, with several ranks every rank's (gathered); a row's gradient is the sum of
        its pairs / ranks (``updates.sum_rows``)."""
        out = {}
        for e in self._groups["adam"].entries:
            grads = getattr(e.param, "row_grads", None)
            if grads is None or not grads.used or e.label in held:
                continue
            ids, g = grads.ids[:grads.used], grads.grads[:grads.used]
            if self.world.distributed:  # every rank holds as many rows (micro-batches alike)
                (ids, work_ids), (g, work_g) = (self.world.start_all_gather(t, t.size(0))
                                                for t in (ids, g))
                work_ids.wait()
                work_g.wait()
            out[e] = ids, g, self.world.world_size
        return out

    def zero_grad(self, adam: bool = True, tables: bool = True) -> None:
        """Set every grad to None (and clear gradients kept as rows); with ``adam`` off, the
        matrix group's only; with ``tables`` off, all but the embedding tables'."""
        for e in self._entries:
            if (adam or e.group == "matrix") and (tables or e.label not in TABLE_LABELS):
                e.param.grad = None
                if getattr(e.param, "row_grads", None) is not None:
                    e.param.row_grads.clear()

    def set_lr_factor(self, factor: float) -> None:
        """Schedule multiplier (warm-up / cool-down) applied to every group's base lr."""
        self.lr_factor = float(factor)

    def set_momentum(self, momentum: float) -> None:
        """Momentum of the matrix optimizer; the trainer drives its warm-up and cool-down."""
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)

    def set_step(self, step: int) -> None:
        """The schedule's step of the next update: ANVIL's rails blend from its engage_step."""
        self.schedule_step = int(step)

    def freeze_scalars(self, n_steps: int) -> None:
        """Leave the scalar group untouched for the next ``n_steps`` calls to step().

        Those steps drop its grads and change none of its weights or state; a new call
        replaces any freeze still running.
        """
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        self.frozen_scalar_steps = int(n_steps)

    def copy_state(self, target: nn.Parameter, source: nn.Parameter) -> None:
        """Give ``target`` a deep copy of ``source``'s state (the untie of the embedding from
        the lm_head); a 2-D state may arrive transposed. Both must be in the same group."""
        entries = [self._by_id.get(id(p)) for p in (target, source)]
        if None in entries:
            raise ValueError("copy_state takes two parameters of this optimizer")
        entry, source_entry = entries
        if source_entry.group != entry.group:
            raise ValueError(
                f"cannot copy {source_entry.group!r} state into a {entry.group!r} parameter"
            )
        entry.state = _copy_state(source_entry.state, entry.state)

    def state_dict(self) -> dict:
        """A snapshot (tensors are cloned) that later steps do not modify; the full state on
        any number of ranks. With several ranks it is a collective: every rank calls it."""
        self._groups["matrix"].gather_state()
        return dict(
            matrix_optimizer=self.matrix_optimizer,
            lr_factor=self.lr_factor,
            momentum=self.momentum,
            frozen_scalar_steps=self.frozen_scalar_steps,
            params=[
                dict(
                    name=e.name,
                    label=e.label,
                    shape=tuple(e.param.shape),
                    state={
                        k: v.clone() if isinstance(v, Tensor) else v for k, v in e.state.items()
                    },
                )
                for e in self._entries
            ],
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict() result, written on any number of ranks; everything is checked
        before anything changes."""
        if state_dict["matrix_optimizer"] != self.matrix_optimizer:
            raise ValueError(
                f"checkpoint uses {state_dict['matrix_optimizer']!r}, "
                f"this optimizer {self.matrix_optimizer!r}"
            )
        saved = {p["name"]: p for p in state_dict["params"]}
        names = [e.name for e in self._entries]
        if len(saved) != len(state_dict["params"]) or set(saved) != set(names):
            raise ValueError(
                f"checkpoint parameters {sorted(saved)} do not match this optimizer's "
                f"{sorted(names)}"
            )
        for e in self._entries:
            s = saved[e.name]
            if s["label"] != e.label or tuple(s["shape"]) != tuple(e.param.shape):
                raise ValueError(
                    f"parameter {e.name!r}: checkpoint has label {s['label']!r} and shape "
                    f"{tuple(s['shape'])}, the model {e.label!r} and {tuple(e.param.shape)}"
                )
            if set(s["state"]) != set(e.state):
                raise ValueError(f"parameter {e.name!r}: state keys {sorted(s['state'])}")
        for e in self._entries:
            for key, value in saved[e.name]["state"].items():
                if isinstance(value, Tensor):
                    e.state[key].copy_(value)
                else:
                    e.state[key] = value
        self.lr_factor = float(state_dict["lr_factor"])
        self.momentum = float(state_dict["momentum"])
        self.frozen_scalar_steps = int(state_dict["frozen_scalar_steps"])


def build_optimizer(model_or_named_params, config: OptimizerConfig,
                    world: World | None = None) -> Optimizers:
    """Build the optimizers from a model or from ``model.named_parameters()``-style pairs."""
    if isinstance(model_or_named_params, nn.Module):
        model_or_named_params = model_or_named_params.named_parameters()
    return Optimizers(model_or_named_params, config, world=world)
