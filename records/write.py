"""Write a record attempt: every full run leaves records/<date>_<run_name>/<run id>.txt (the
sources, the resolved config, the environment and the log: the attempt can be reproduced from
it alone, as in the speedrun) and <run id>.json (the figures that ``records.summary`` reads)."""

import json
import platform
import subprocess
from datetime import datetime
from pathlib import Path

import torch

from utils import REPO_ROOT, repo_path


def git_commit(root=REPO_ROOT):
    """HEAD's hash, with "-dirty" when tracked files differ from it (the record's .txt then
    holds the sources that actually ran); None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
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


def source_files(root=REPO_ROOT):
    """The project's .py files, tests and hidden folders left out."""
    return sorted(p for p in root.rglob("*.py")
                  if not any(part.startswith(".") for part in p.relative_to(root).parts)
                  and "tests" not in p.relative_to(root).parts)


def write_record(config, result, log_path, device, run_id, world):
    """Write the attempt's .txt and .json; returns the .json's path."""
    date = datetime.now().strftime("%Y-%m-%d")
    tc = config.training
    folder = Path(repo_path(tc.records_dir)) / f"{date}_{tc.run_name}"
    folder.mkdir(parents=True, exist_ok=True)
    parts = [f"==== {source.relative_to(REPO_ROOT)} ====\n{source.read_text()}"
             for source in source_files()]
    parts.append(f"==== resolved config ====\n{json.dumps(config.raw, indent=1, default=str)}")
    parts.append(f"==== environment ====\n{environment_report(device, world)}")
    parts.append(f"==== log ====\n{Path(log_path).read_text()}")
    (folder / f"{run_id}.txt").write_text("\n\n".join(parts))
    figures = dict(result, seed=tc.seed, git_commit=git_commit(), gpu=device.name,
                   world_size=world.world_size,
                   gpu_count=world.world_size if device.kind == "cuda" else 0,
                   torch=torch.__version__, run_id=run_id, date=date,
                   target_val_loss=tc.target_val_loss, config_name=tc.run_name)
    (folder / f"{run_id}.json").write_text(json.dumps(figures, indent=1))
    return folder / f"{run_id}.json"
