"""Summarise record attempts, from one folder or several: a table of every attempt, the
statistics of val loss and train time, the speedrun's t-test, one plot for all.

    python -m records.summary records/2026-11-21_base [records/2026-11-22_base ...]
    python -m records.summary "records/*_base" [--target 3.28] [--plot out.png]

A record is accepted when the mean val loss over its attempts is below the target with
p < 0.01 in a one-sided one-sample t-test (the speedrun's rule; ``scipy.stats.ttest_1samp``).
The plot shows each attempt's val loss against train time, its curve where the record holds
its validations; it needs matplotlib (``uv sync --extra plot``): without it the summary is
printed and the plot skipped.
"""

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path

ACCEPT_P = 0.01


def one_sided_t_test(values, target):
    """t statistic and p-value of H1: mean(values) < target."""
    from scipy.stats import ttest_1samp

    if len(values) < 2:
        raise ValueError("the t-test needs at least two attempts")
    result = ttest_1samp(values, target, alternative="less")
    return float(result.statistic), float(result.pvalue)


def folders_of(patterns) -> list[Path]:
    """Folders named, or matched by glob patterns (a shell may not have expanded them)."""
    folders = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        folders += [Path(m) for m in matches]
    return list(dict.fromkeys(folders))


def load_attempts(folders) -> list[dict]:
    """Every attempt (*.json) of the folders, each with its folder's name under "folder"."""
    attempts = []
    for folder in folders:
        found = [dict(json.loads(p.read_text()), folder=folder.name)
                 for p in sorted(Path(folder).glob("*.json"))]
        if not found:
            raise FileNotFoundError(f"no record attempts (*.json) in {folder}")
        attempts += found
    return attempts


def spread(values):
    """Mean and sample standard deviation; the deviation is None for a single value."""
    if len(values) < 2:
        return statistics.mean(values), None
    return statistics.mean(values), statistics.stdev(values)


def summarize(attempts, target=None):
    target = attempts[0]["target_val_loss"] if target is None else target
    losses = [a["val_loss"] for a in attempts]
    loss_mean, loss_std = spread(losses)
    time_mean, time_std = spread([a["train_time"] for a in attempts])
    summary = {"attempts": len(attempts), "target": target, "val_loss_mean": loss_mean,
               "val_loss_std": loss_std, "train_time_mean": time_mean,
               "train_time_std": time_std, "t": None, "p_value": None, "accepted": False}
    if len(attempts) >= 2:
        summary["t"], summary["p_value"] = one_sided_t_test(losses, target)
        summary["accepted"] = summary["p_value"] < ACCEPT_P
    return summary


def table(attempts):
    """One line per attempt."""
    yield (f"{'folder':<24} {'run':<8} {'seed':>5} {'steps':>6} {'val loss':>9} "
           f"{'train time':>11}  commit")
    for a in attempts:
        yield (f"{a['folder']:<24} {a.get('run_id', '-')[:8]:<8} {a.get('seed', '-'):>5} "
               f"{a.get('steps', '-'):>6} {a['val_loss']:>9.4f} {a['train_time']:>10.1f}s  "
               f"{(a.get('git_commit') or '-')[:12]}")


def with_spread(mean, std, fmt):
    if std is None:
        return f"{mean:{fmt}} (one attempt: no spread)"
    return f"{mean:{fmt}} +- {std:{fmt}}"


def plot(attempts, target, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (uv sync --extra plot)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a in attempts:
        label = f"{a['folder']} {a.get('run_id', '')[:8]}"
        history = a.get("history") or [[a.get("steps"), a["train_time"], a["val_loss"]]]
        times, losses = [h[1] for h in history], [h[2] for h in history]
        ax.plot(times, losses, marker="o", markersize=3, label=label)
    ax.axhline(target, color="red", linestyle="--", label=f"target {target}")
    ax.set_xlabel("train time (s)")
    ax.set_ylabel("val loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+",
                        help="records/<date>_<run_name> folders, or glob patterns of them")
    parser.add_argument("--target", type=float, default=None,
                        help="val loss target (default: the attempts' own)")
    parser.add_argument("--plot", default=None,
                        help="PNG path (default: summary.png in the first folder)")
    args = parser.parse_args(argv)
    folders = folders_of(args.folders)
    try:
        attempts = load_attempts(folders)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    s = summarize(attempts, args.target)
    for line in table(attempts):
        print(line)
    print(f"{s['attempts']} attempts in {len(folders)} folder{'s' * (len(folders) > 1)}")
    print(f"val loss   {with_spread(s['val_loss_mean'], s['val_loss_std'], '.4f')} "
          f"(target {s['target']})")
    print(f"train time {with_spread(s['train_time_mean'], s['train_time_std'], '.1f')} s")
    if s["p_value"] is None:
        print("p-value: needs at least two attempts")
    else:
        verdict = "accepted" if s["accepted"] else "not accepted"
        print(f"one-sided t-test, mean < target: t = {s['t']:.3f}, p = {s['p_value']:.4g} "
              f"({verdict}: the rule is p < {ACCEPT_P})")
    written = plot(attempts, s["target"], args.plot or folders[0] / "summary.png")
    if written:
        print(f"plot written: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
