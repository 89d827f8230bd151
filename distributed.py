"""The torchrun world: which process this is, its process group, and the trainer's collectives.

    torchrun --standalone --nproc_per_node=N run.py --config config/base.py

torchrun starts N processes and tells each its place in RANK, WORLD_SIZE and LOCAL_RANK.
Without them (a plain ``python run.py``) the world is one process, rank 0 of 1: no process
group is made and every helper returns its input untouched, so the single-GPU run pays nothing.
The optimizer (optimizers.py) decides which gradients go through which collective. NCCL runs
with its own defaults and whatever the environment sets (README, Several GPUs, names the
variables that turn NVLink multicast off on hosts that need it).
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    local_rank: int = 0  # the index of this process's GPU on its node
    world_size: int = 1

    @classmethod
    def from_env(cls, environ=os.environ):
        """The world torchrun describes in the environment; one process when it does not."""
        if "WORLD_SIZE" not in environ:
            return cls()
        return cls(int(environ["RANK"]), int(environ["LOCAL_RANK"]), int(environ["WORLD_SIZE"]))

    @property
    def is_main(self):
        """Rank 0 speaks for the run: it prints, logs, checkpoints and writes records."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def torch_device(self, kind):
        """This process's device: GPU LOCAL_RANK of its node, or the CPU."""
        return torch.device("cuda", self.local_rank) if kind == "cuda" else torch.device("cpu")

    def init(self, device_kind):
        """Pin this process to its GPU and join the process group: NCCL on GPUs, gloo on CPUs.

        utils.detect_device has checked that the node has a GPU for LOCAL_RANK.
        """
        device = self.torch_device(device_kind)
        if device_kind == "cuda":
            torch.cuda.set_device(device)
        if not self.distributed:
            return
        if device_kind == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")

    def shutdown(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives that are the identity in a world of one -----------------------------------

    def all_reduce_mean(self, tensor):
        """The mean of ``tensor`` over the ranks, in place; returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.AVG)
        return tensor

    def all_true(self, flag, device):
        """Whether ``flag`` holds on every rank, so that all ranks can take the same way out."""
        if not self.distributed:
            return flag
        value = torch.tensor(int(flag), device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def broadcast_object(self, value, device):
        """Rank 0's ``value`` (anything picklable) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=device)
        return box[0]

    def broadcast_tensors(self, tensors):
        """Overwrite ``tensors`` with rank 0's values, in place."""
        if self.distributed:
            for tensor in tensors:
                dist.broadcast(tensor, src=0)

    # -- collectives started for the optimizer to wait on; several ranks only -------------------

    def start_all_reduce_mean(self, tensors):
        """Start averaging each of ``tensors`` over the ranks, in place; returns the works."""
        return [dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True) for t in tensors]

    def start_reduce_scatter_mean(self, stacked, per_rank):
        """Start averaging ``stacked`` (K, ...) over the ranks, rank r keeping the rows
        r * per_rank onwards: returns that share (per_rank, ...) and the work to wait for.
        Rows past K are zeros, so K need not divide among the ranks."""
        padded = _padded(stacked, per_rank * self.world_size)
        share = stacked.new_empty(per_rank, *stacked.shape[1:])
        work = dist.reduce_scatter_tensor(share, padded, op=dist.ReduceOp.AVG, async_op=True)
        return share, work

    def start_all_gather(self, share, per_rank):
        """Start gathering every rank's ``share`` of at most ``per_rank`` rows: returns the
        (per_rank * world_size, ...) stack, each share padded to per_rank rows, and the work."""
        stacked = share.new_empty(per_rank * self.world_size, *share.shape[1:])
        work = dist.all_gather_into_tensor(stacked, _padded(share, per_rank), async_op=True)
        return stacked, work


def _padded(stacked, rows):
    missing = rows - stacked.size(0)
    if not missing:
        return stacked
    return torch.cat([stacked, stacked.new_zeros(missing, *stacked.shape[1:])])
