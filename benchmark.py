"""Benchmark mode (``run.py --benchmark``): time each stage of the schedule, print a table.

After compile and warm-up, each stage of the schedule is timed for
``training_config.benchmark_steps`` steps, after two untimed ones, with CUDA events (or
synchronised clocks on the CPU); the table reports means (Adam steps every
``schedule.adam_every`` steps, so consecutive steps differ; an even number are timed). The
optimizer step (with the embedding tie's fold and copy) is timed on its own to give its share
of the step. The projected train time is the sum over the stages of their steps times their
mean step time; a stage whose sampled softmax changes its candidate count is timed in parts, one
a count (record #92's third stage: 20 ms a step more with 24,576 candidates than with
14,336). The same figures go to a JSON file beside the run's log. It trains on real
batches but is not a training run: no validation, no record; it does check that the timed
steps' losses are finite (a step that diverges can be fast), and exits with status 1 where they
are not. Under torchrun every rank runs it and rank 0 reports: tokens/s count all ranks'
tokens, MFU is per GPU.
"""

import gzip
import json
import math
import statistics
import time

import torch

UNTIMED_STEPS = 2


class StepTimer:
    """Times regions on the device: CUDA events on a GPU, synchronised clocks on the CPU."""

    def __init__(self, cuda):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end):
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1000


def time_stage(manager, plan, steps, timer):
    """Mean step and optimizer milliseconds of ``steps`` steps of ``plan``, after
    UNTIMED_STEPS untimed ones, and the steps' mean loss (read after the timing); Adam steps
    as often as in the run (schedule.adam_every)."""
    step_ms, optimizer_ms, losses = [], [], []
    for i in range(UNTIMED_STEPS + steps):
        start = timer.mark()
        losses.append(manager.accumulate(plan))
        middle = timer.mark()
        manager.optimizer_step(manager.schedule.at(plan.step + i))
        end = timer.mark()
        if i >= UNTIMED_STEPS:
            step_ms.append((start, end))
            optimizer_ms.append((middle, end))
    return (statistics.mean(timer.elapsed_ms(a, b) for a, b in step_ms),
            statistics.mean(timer.elapsed_ms(a, b) for a, b in optimizer_ms),
            torch.stack(losses).mean().item())


def timed_spans(schedule) -> list[tuple[int, int, int]]:
    """(stage number, first step, end) of each part of a stage timed on its own: the stages,
    cut where the sampled softmax's candidate count changes inside one."""
    switches = [step for step, _ in schedule.config.sampled_softmax]
    out = []
    for stage, (first, end) in enumerate(schedule.spans(), start=1):
        cuts = [first, *(s for s in switches if first < s < end), end]
        out += [(stage, a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
    return out


def stage_plan(manager, first):
    """Apply the stage's first step (its windows, YaRN, untie and freeze, as the run would)
    and return the plan of its second step: its shape and windows, no transition. The
    gradients held from the stage timed before go: the benchmark jumps between stages, which a
    run never does, and the n-gram table's rows of two stages would overflow their buffer."""
    manager.optimizer.zero_grad()
    manager.apply(manager.schedule.at(first))
    plan = manager.schedule.at(first + 1)
    manager.apply(plan)
    return plan


def profile_largest_stage(manager, steps=3, rows=25):
    """torch.profiler over a few steps of the stage that trains the most tokens (where a run
    spends most of its time): the kernels by device time, and a Chrome trace (for Perfetto or
    chrome://tracing) beside the run's log, where the gaps between kernels show whether the
    device waits on the host."""
    from torch.profiler import ProfilerActivity, profile

    cuda = manager.device.kind == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    schedule = manager.schedule
    first, _ = max(schedule.spans(), key=lambda span: (span[1] - span[0])
                   * schedule.at(span[0]).tokens)
    plan = stage_plan(manager, first)
    with profile(activities=activities) as prof:
        for i in range(steps):
            manager.accumulate(plan)
            manager.optimizer_step(manager.schedule.at(plan.step + i))
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    path = manager.logger.path.with_name(manager.logger.path.stem + "_trace.json.gz")
    if manager.world.is_main:
        prof.export_chrome_trace(str(path))
        with gzip.open(path, "rt") as f:
            events = json.load(f)["traceEvents"]
        table += "".join(f"\n{line}" for line in device_gaps(events))
    return table, path


GAP_BINS_US = (10, 100, 1000)


def device_gaps(events, longest=5) -> list[str]:
    """Where the device waited, from a Chrome trace: how busy it was from its first kernel (or
    copy) to the end of its last (the union of their intervals), the idle time by gap length,
    and the ``longest`` gaps with the kernel before each and the innermost host calls that
    cover most of it (what the host was doing meanwhile). No lines without device events."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "?")) for e in events
                   if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy",
                                                               "gpu_memset"))
    if not spans:
        return []
    busy, gaps = 0.0, []
    start, end, last = spans[0]
    for lo, hi, name in spans[1:]:
        if lo > end:
            busy += end - start
            gaps.append((lo - end, end, lo, last))
            start = lo
        if hi >= end:
            end, last = hi, name
    busy += end - start
    wall = end - spans[0][0]
    edges = (0, *GAP_BINS_US, float("inf"))
    bins = [sum(g[0] for g in gaps if lo <= g[0] < hi) / 1000
            for lo, hi in zip(edges, edges[1:], strict=False)]
    labels = [f"under {GAP_BINS_US[0]} us", *(f"{lo}-{hi} us" for lo, hi in
                                               zip(GAP_BINS_US, GAP_BINS_US[1:], strict=False)),
              f"over {GAP_BINS_US[-1]} us"]
    lines = [f"device busy {busy / wall:.1%} of the {wall / 1000:,.1f} ms from the first kernel "
             f"to the last ({(wall - busy) / 1000:,.1f} ms idle in {len(gaps):,} gaps: "
             + ", ".join(f"{ms:,.1f} ms {label}" for ms, label in zip(bins, labels, strict=True))
             + ")"]
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op",
                                                                          "cuda_runtime")]
    for gap, lo, hi, before in sorted(gaps, reverse=True)[:longest]:
        covering = sorted((e for e in host if min(hi, e["ts"] + e.get("dur", 0))
                           - max(lo, e["ts"]) > gap / 2), key=lambda e: e.get("dur", 0))
        calls = "; ".join(f"{e['name'][:48]} {e.get('dur', 0) / 1000:.2f} ms"
                          for e in covering[:2]) or "none traced"
        lines.append(f"  gap {gap / 1000:.2f} ms at {(lo - spans[0][0]) / 1000:,.1f} ms after "
                     f"{before[:48]}; host: {calls}")
    return lines


def run_benchmark(manager, profile=False):
    """Time every stage; print the table, write the JSON; with ``profile``, also print where
    the device time of the largest stage goes. Returns the exit status: 0, or 1 where a
    stage's loss is not finite."""
    log = manager.logger.print
    cuda = manager.device.kind == "cuda"
    compile_s = manager.warmup() if manager.config.compile.enabled else 0.0
    if compile_s:
        log(f"compile and warm-up: {compile_s:.1f}s ({manager.warmup_summary()})")
    timer = StepTimer(cuda)
    # whole periods of the Adam steps and of the tables' (one table step in each period)
    every = max(manager.schedule.config.adam_every, manager.schedule.config.table_adam_every)
    steps = -(-manager.tc.benchmark_steps // every) * every
    schedule = manager.schedule
    rows = []
    for stage, first, end in timed_spans(schedule):
        if end - first < 2:
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        plan = stage_plan(manager, first)
        step_ms, optimizer_ms, loss = time_stage(manager, plan, steps, timer)
        short, long = plan.windows
        row = {"stage": stage, "steps": f"{first}-{end - 1}", "num_steps": end - first,
               "tokens_per_step": plan.tokens, "candidates": plan.candidates,
               "accumulation": plan.accumulation,
               "windows": f"{short}/{long}", "ms_per_step": step_ms,
               "tokens_per_s": plan.tokens / step_ms * 1000,
               "tflops": manager.flops_per_step(plan) / step_ms / 1e9,
               "optimizer_ms": optimizer_ms, "optimizer_share": optimizer_ms / step_ms,
               "mfu": manager.mfu(plan, step_ms / 1000), "loss": loss, "peak_allocated_gb": None,
               "peak_reserved_gb": None}
        if cuda:
            row["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
            row["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        rows.append(row)
    # a stage too short to time (under 2 steps) counts at the last timed stage's rate
    projected = sum(r["num_steps"] * r["ms_per_step"] for r in rows) / 1000
    untimed = schedule.total - sum(r["num_steps"] for r in rows)
    if untimed and rows:
        projected += untimed * rows[-1]["ms_per_step"] / 1000
    result = {"device": manager.device.name, "world_size": manager.world.world_size,
              "torch": torch.__version__,
              "compile_and_warmup_s": compile_s,
              "warmup_phases_s": dict(manager.warmup_phases),
              "timed_steps_per_stage": steps,
              "micro_batch_tokens": schedule.micro_batch_tokens, "stages": rows,
              "projected_train_time_s": projected, "total_steps": schedule.total}
    for line in format_table(result):
        log(line)
    if manager.world.is_main:
        path = manager.logger.path.with_name(manager.logger.path.stem + "_benchmark.json")
        path.write_text(json.dumps(result, indent=1))
        log(f"benchmark written: {path}")
    if profile:
        table, path = profile_largest_stage(manager)
        log(table)
        log(f"trace written: {path}")
    diverged = [r for r in rows if not math.isfinite(r["loss"])]
    for r in diverged:
        log(f"error: the loss is {r['loss']} in stage {r['stage']} (steps {r['steps']}): these "
            "timings are of steps that do not train")
    return 1 if diverged else 0


def format_table(result):
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    yield (f"benchmark on {result['world_size']} x {result['device']} (torch "
           f"{result['torch']}), means of "
           f"{result['timed_steps_per_stage']} steps, micro-batch "
           f"{result['micro_batch_tokens']:,} tokens, compile + warm-up "
           f"{result['compile_and_warmup_s']:.0f}s")
    yield (f"{'stage':>5} {'steps':>11} {'tokens':>8} {'win':>6} {'softmax':>7} {'ms/step':>8} "
           f"{'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'opt':>6} {'alloc GB':>9} "
           f"{'resv GB':>8}")
    for r in result["stages"]:
        softmax = f"{r['candidates']:,}" if r["candidates"] else "full"
        yield (f"{r['stage']:>5} {r['steps']:>11} {r['tokens_per_step']:>8,} "
               f"{r['windows']:>6} {softmax:>7} {r['ms_per_step']:>8.1f} "
               f"{r['tokens_per_s']:>10,.0f} "
               f"{r['tflops']:>8.1f} {cell(r['mfu'], '>6.1%')} "
               f"{r['optimizer_share']:>6.1%} {cell(r['peak_allocated_gb'], '>9.1f')} "
               f"{cell(r['peak_reserved_gb'], '>8.1f')}")
    yield (f"projected train time: {result['projected_train_time_s']:.1f}s for the "
           f"{result['total_steps']} steps (each stage's steps x its mean step time)")
