"""What every layer uses: the weightless RMSNorm, labelled parameters, initialisation, gates."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_EPS = torch.finfo(torch.float32).eps
GATE_CHANNELS = 12  # gates read the first few channels of their input: cheap and enough


def norm(x: Tensor) -> Tensor:
    """RMSNorm without a learnable weight. The eps is float32's at every dtype: by default a
    bf16 input would get bf16's (2**-7), a different function from the float32 path's."""
    return F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)


def make_param(tensor: Tensor, label: str, lr_mul: float = 1.0, wd_mul: float = 1.0):
    """A parameter that tells optimizers.py its group (label) and its lr/wd multipliers."""
    param = nn.Parameter(tensor)
    param.label, param.lr_mul, param.wd_mul = label, lr_mul, wd_mul
    return param


def uniform_matrix(*shape, std_scale: float, fan_in: int) -> Tensor:
    bound = math.sqrt(3) * std_scale / math.sqrt(fan_in)  # uniform(-b, b) has std b/sqrt(3)
    return torch.empty(*shape).uniform_(-bound, bound)


def gate_input(x: Tensor) -> Tensor:
    return x[..., :GATE_CHANNELS]


def true_columns(mask: Tensor, width: int) -> Tensor:
    """Per row of a (rows, n) boolean mask, the ascending indices of its True columns in the
    first ``width`` slots (slots past a row's count hold 0; no row may have more than
    ``width``). By ranks from a cumulative sum and one scatter: no sort, which inductor would
    fuse into slow-compiling kernels, and no host sync."""
    rows, n = mask.shape
    rank = torch.where(mask, mask.cumsum(-1) - 1, width)  # False: a spare slot
    columns = torch.arange(n, device=mask.device).expand(rows, n)
    slots = torch.zeros(rows, width + 1, dtype=columns.dtype, device=mask.device)
    return slots.scatter(1, rank, columns)[:, :width]
