"""Checkpoints and trained models on disk, in a format that opens without running code.

A file is a safetensors file: the tensors by name, and in its metadata one JSON document with
everything else (the step, the loader's position, RNG states, history, the config), in which
each tensor of the state stands as ``{"__tensor__": name}``. Opening a file someone shared
reads numbers only; unpickling it (``torch.load(..., weights_only=False)``, what the trainer
did before) could run any code the file carries.

Two kinds, told apart by the metadata's ``kind``:

* ``checkpoint``: the whole training state (``TrainingManager.save_checkpoint``), for
  ``--resume``; written every ``checkpoint_every`` steps and on interrupt, the newest
  ``keep_checkpoints`` of a run kept.
* ``model``: the trained weights and the config they were trained with, written at the end of
  every full run; ``sample.py`` and ``evaluate.py`` read either kind (``load_model``).

Every write goes to ``<name>.tmp`` first and is renamed into place, so a file under its own name
is always complete; a ``.tmp`` is what a killed write leaves behind.
"""

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from utils import ConfigError

FORMAT = "speedrun-gpt"
VERSION = 1
SUFFIX = ".safetensors"
PARTIAL = ".tmp"
TENSOR = "__tensor__"


class CheckpointError(ConfigError):
    """A file that is not a complete checkpoint or model of this trainer (bad input: exit 2)."""


# ----------------------------------------------------------------------------------------------
# Nested state <-> (JSON document, tensors)


def _split(value, tensors: dict, path: str):
    """``value`` as JSON-ready data; its tensors go into ``tensors`` under their path."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {TENSOR: path}
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"{path or 'state'}: keys must be strings to survive JSON")
        return {key: _split(item, tensors, f"{path}/{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(item, tensors, f"{path}/{i}") for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{path or 'state'}: {type(value).__name__} is neither a tensor nor plain "
                    "data")


def _join(value, tensors: dict):
    """The inverse of ``_split``; lists stay lists (the readers convert where they need)."""
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return tensors[value[TENSOR]]
        return {key: _join(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [_join(item, tensors) for item in value]
    return value


# ----------------------------------------------------------------------------------------------
# State that is not a module's or an optimizer's


def to_host(state):
    """A copy of a state (tensors in dicts and lists) in host memory."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: to_host(value) for key, value in state.items()}
    if isinstance(state, list):
        return [to_host(value) for value in state]
    return state


def rng_state():
    """Every generator the run draws from, as plain data and CPU byte tensors (a checkpoint
    keeps it as JSON and tensors)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), position, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    # RNG states are CPU byte tensors; a checkpoint read onto the GPU moved them
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])



# ----------------------------------------------------------------------------------------------
# Files


def write(path, kind: str, state: dict) -> Path:
    """Write ``state`` as a file of ``kind`` at ``path``, atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    document = json.dumps(_split(state, tensors, ""))
    partial = path.with_name(path.name + PARTIAL)
    save_file(tensors, partial, metadata={"format": FORMAT, "version": str(VERSION),
                                          "kind": kind, "state": document})
    os.replace(partial, path)
    return path


def read(path, device="cpu", kind: str | None = None) -> tuple[str, dict]:
    """(kind, state) of the file at ``path``, its tensors on ``device``; CheckpointError when it
    is no complete file of this trainer (or not of ``kind``, when given)."""
    path = Path(path)
    if path.name.endswith(PARTIAL):
        raise CheckpointError(f"{path} is a partial file left by an interrupted write, not a "
                              f"checkpoint{_complete_ones_beside(path)}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}{_pickle_hint(path)}") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but no checkpoint or model of "
                              "this trainer (its metadata lacks format=speedrun-gpt)")
    if int(metadata["version"]) != VERSION:
        raise CheckpointError(f"{path} has format version {metadata['version']}; this trainer "
                              f"reads version {VERSION}")
    if kind is not None and metadata["kind"] != kind:
        raise CheckpointError(f"{path} is a {metadata['kind']}, not a {kind}: --resume takes a "
                              "checkpoint (the final model holds no optimizer state)")
    return metadata["kind"], _join(json.loads(metadata["state"]), tensors)


def _pickle_hint(path: Path) -> str:
    """What to do with a torch.save file (a zip archive or a bare pickle)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return (" (this looks like a torch.save file, e.g. a checkpoint of an older version of "
                "this trainer: such files are not opened, since unpickling can run code)")
    return ""


def _complete_ones_beside(path: Path) -> str:
    complete = sorted(path.parent.glob(f"*{SUFFIX}"))
    if not complete:
        return ""
    return f"; complete ones in {path.parent}: " + ", ".join(p.name for p in complete[-3:])


# ----------------------------------------------------------------------------------------------
# A run's checkpoints on disk


def checkpoint_path(folder, prefix: str, step: int) -> Path:
    """Names sort by step: ``<prefix>_step000123.safetensors``."""
    return Path(folder) / f"{prefix}_step{step:06d}{SUFFIX}"


def model_path(folder, prefix: str) -> Path:
    return Path(folder) / f"{prefix}_model{SUFFIX}"


def prune(folder, prefix: str, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints of ``prefix`` (0: keep all); returns the
    deleted paths."""
    if keep == 0:
        return []
    found = sorted(Path(folder).glob(f"{prefix}_step*{SUFFIX}"))
    for old in found[:-keep]:
        old.unlink()
    return found[:-keep]


def remove_partials(folder, prefix: str) -> list[Path]:
    """Delete the ``.tmp`` files of ``prefix`` that interrupted writes left; returns them."""
    partials = sorted(Path(folder).glob(f"{prefix}_*{SUFFIX}{PARTIAL}"))
    for partial in partials:
        partial.unlink()
    return partials


# ----------------------------------------------------------------------------------------------
# A trained model


def load_model(path, device="cpu"):
    """The GPT of a model or checkpoint file, on ``device``, at the attention windows of the final
    validation (``schedule.validation_windows``, without YaRN: what a trained model is evaluated
    and sampled with). Returns (model, state); state["config"] is the run's resolved config."""
    from model import build_model, model_config

    _, state = read(path, device)
    try:
        config = model_config(state["config"]["model_config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    model = build_model(config).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit this version's model "
                              f"({str(exc).splitlines()[0]})") from exc
    model.yarn.set_windows(state["config"]["schedule"]["validation_windows"], yarn=False)
    return model.eval(), state
