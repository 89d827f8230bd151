"""Config sections, device detection, and the settings torch needs before it compiles.

``build_section`` turns one section of a config (a dict) into its typed, checked dataclass;
each section's dataclass lives beside the code that uses it. ``setup_environment`` sets the
variables that the CUDA allocator, inductor and Triton read at their first use (allocator,
cache folders), so run.py calls it before the first CUDA tensor or compile;
``configure_torch`` then sets the in-process flags.
"""

import os
import types
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent


class ConfigError(Exception):
    """A problem with the config or the command line; run.py prints it and exits with status 2."""


def repo_path(path) -> str:
    """Relative paths in a config are relative to the repository root."""
    path = Path(path).expanduser()
    return str(path if path.is_absolute() else REPO_ROOT / path)


def frozen(value):
    """Lists from a config or an override become tuples, so a section stays hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
    return value


def build_section(cls, name: str, values):
    """``cls(**values)`` for the config section ``name``: every field without a default must
    be given and no other key may be, each of the type its annotation declares (ints widen to
    floats); the dataclass checks the ranges of its values in ``__post_init__``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{name} must be a dict, got {type(values).__name__}")
    known = fields(cls)
    required = {f.name for f in known if f.default is MISSING and f.default_factory is MISSING}
    unknown = sorted(set(values) - {f.name for f in known})
    missing = sorted(required - set(values))
    if unknown or missing:
        raise ConfigError(f"{name}: unknown keys {unknown}, missing keys {missing}")
    hints = typing.get_type_hints(cls)
    return cls(**{key: _typed(f"{name}.{key}", frozen(value), hints[key])
                  for key, value in values.items()})


def _typed(path, value, annotation):
    """``value`` if it is of the annotated type (an int given for a float becomes a float);
    otherwise a ConfigError that names the key, what it expects and what it got."""
    options = (typing.get_args(annotation)
               if isinstance(annotation, types.UnionType) else (annotation,))
    for option in options:
        if option is type(None) and value is None:
            return value
        if option is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if option in (int, float) and isinstance(value, bool):
            continue  # True is an int to Python, never a count or a rate here
        if isinstance(option, type) and option is not type(None) and isinstance(value, option):
            return value
    expected = " or ".join("None" if o is type(None) else getattr(o, "__name__", str(o))
                           for o in options)
    raise ConfigError(f"config key '{path}' expects {expected}, got "
                      f"{type(value).__name__} {value!r}")


def check_ranges(section: str, config, positive=(), non_negative=(), fractions=(),
                 below_one=()):
    """Raise a ConfigError naming every key of ``config`` out of its range: ``positive``
    keys > 0, ``non_negative`` >= 0, ``fractions`` in [0, 1], ``below_one`` in [0, 1).
    A key whose value is None (optional and unset) is not checked."""
    rules = [(positive, "> 0", lambda v: v > 0), (non_negative, ">= 0", lambda v: v >= 0),
             (fractions, "in [0, 1]", lambda v: 0 <= v <= 1),
             (below_one, "in [0, 1)", lambda v: 0 <= v < 1)]
    problems = [f"{key} must be {text}, got {getattr(config, key)!r}"
                for keys, text, ok in rules for key in keys
                if getattr(config, key) is not None and not ok(getattr(config, key))]
    if problems:
        raise ConfigError(f"{section}: " + "; ".join(problems))


# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) for MFU. Names as torch reports them;
# the first matching substring wins, so more specific names come first.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("RTX PRO 6000", 503.8),
    ("RTX 5090", 209.5),
    ("RTX 5080", 112.6),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 4080", 97.5),
    ("RTX 6000 Ada", 364.2),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 3090", 71.0),
    ("A6000", 154.8),
]


@dataclass(frozen=True)
class DeviceInfo:
    """What the trainer needs to know about the device it runs on."""

    kind: str  # "cuda" or "cpu"
    name: str
    arch: str  # ampere, ada, hopper, blackwell, blackwell_consumer, older, cpu
    capability: tuple  # (major, minor); (0, 0) on the CPU
    shared_memory_per_block: int  # opt-in bytes a Triton kernel may use per block
    peak_tflops: float | None  # dense bf16; None where unknown (then MFU is not reported)


def arch_from_capability(major, minor):
    """Map a CUDA compute capability to the architecture families the trainer tunes for."""
    if major == 8:
        return "ada" if minor >= 9 else "ampere"
    if major == 9:
        return "hopper"
    if major == 10:
        return "blackwell"
    if major >= 12:  # RTX 50xx and RTX PRO: ~100 KB of shared memory per block, not 228 KB
        return "blackwell_consumer"
    return "older"


def peak_tflops_for(name):
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def detect_device(kind, index=0):
    """Describe the device (GPU ``index``, torchrun's LOCAL_RANK); raises ConfigError when CUDA
    is asked for and there is none, or fewer GPUs than processes on this node."""
    import torch

    if kind == "cpu":
        return DeviceInfo("cpu", "cpu", "cpu", (0, 0), 0, None)
    if not torch.cuda.is_available():
        raise ConfigError("the run asks for a CUDA GPU (training_config.device 'cuda') and "
                          "none was found: add --device cpu to run this config on the CPU, or "
                          "use --config config/cpu.py, a tiny model sized for it")
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"process {index} of this node needs GPU {index}, but only {count} "
                          f"are visible: start at most {count} per node "
                          f"(torchrun --nproc_per_node={count})")
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(
        kind="cuda",
        name=props.name,
        arch=arch_from_capability(props.major, props.minor),
        capability=(props.major, props.minor),
        shared_memory_per_block=getattr(props, "shared_memory_per_block_optin", 0),
        peak_tflops=peak_tflops_for(props.name),
    )


@dataclass(frozen=True)
class CompileConfig:
    """``compile_config``: torch.compile of the model and the optimizer's updates."""

    enabled: bool
    cache_dir: str  # inductor and Triton caches, reused by the next run; relative to the repo
    coordinate_descent_tuning: bool


def setup_environment(cache_dir=".cache"):
    """Environment read by torch/inductor/Triton at first use; call before compiling.

    Caches live in an ignored folder of the checkout (default ``.cache/``) so a second run
    reuses the compiled kernels. Variables already set by the user are left alone.
    """
    cache = Path(cache_dir).expanduser()
    if not cache.is_absolute():
        cache = REPO_ROOT / cache
    # expandable segments: the batch-size stages change activation sizes; this avoids
    # fragmentation when they do.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    return cache


def patch_triton_shared_memory(device, driver_utils=None):
    """Consumer Blackwell (sm_120): make Triton size its kernels for the device's real
    per-block shared memory (torch's shared_memory_per_block_optin, about 100 KB), not a figure
    meant for sm_90/sm_100 (228 KB), and have inductor prune the FlexAttention and matmul
    configs that cannot fit. Other architectures are left alone. Returns whether it patched.

    Untested on real sm_120 hardware here (only an H100 was available); the test checks the
    patch against a stand-in for Triton's driver utilities."""
    if device.arch != "blackwell_consumer" or not device.shared_memory_per_block:
        return False
    if driver_utils is None:
        from triton.runtime import driver

        driver_utils = driver.active.utils
    original = driver_utils.get_device_properties
    limit = device.shared_memory_per_block

    def get_device_properties(index):
        return dict(original(index), max_shared_mem=limit)

    driver_utils.get_device_properties = get_device_properties
    import torch._inductor.config as inductor_config

    inductor_config.max_autotune_prune_choices_based_on_shared_mem = True
    return True


def configure_torch(device, compile_config: CompileConfig):
    """In-process flags for matmul precision, dynamo and inductor."""
    import torch

    if device.kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        patch_triton_shared_memory(device)
    if not compile_config.enabled:
        return
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    # Each schedule stage is a distinct shape; they are all compiled up front.
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
    inductor_config.coordinate_descent_tuning = compile_config.coordinate_descent_tuning
