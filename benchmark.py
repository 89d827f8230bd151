"""Benchmark mode (``run.py --benchmark``): time each stage of the schedule, print a table.

After compile and warm-up, each distinct (batch size, window) stage of the schedule is timed
for ``training_config.benchmark_steps`` steps, after two untimed ones, with CUDA events (or
synchronised clocks on the CPU); the table reports medians. The optimizer step is timed on its
own to give its share of the step. The same figures go to a JSON file beside the run's log.
It trains on real batches but is not a training run: no validation, no record. Under torchrun
every rank runs it and rank 0 reports: tokens/s count all ranks' tokens, MFU is per GPU.
"""

import json
import statistics
import time

import torch

from optimizers import Optimizers

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


class TimedOptimizer:
    """Wraps the manager's optimizer so each step() is timed; everything else passes through."""

    def __init__(self, optimizer: Optimizers, timer: StepTimer):
        self.optimizer, self.timer, self.spans = optimizer, timer, []

    def step(self):
        start = self.timer.mark()
        self.optimizer.step()
        self.spans.append((start, self.timer.mark()))

    def __getattr__(self, name):
        return getattr(self.optimizer, name)


def time_stage(manager, first_step, steps, timer):
    """Median step and optimizer milliseconds of ``steps`` steps in the stage at first_step."""
    optimizer = TimedOptimizer(manager.optimizer, timer)
    manager.optimizer = optimizer
    step_spans = []
    for i in range(UNTIMED_STEPS + steps):
        # Every timed step takes the stage's second step: its shape and windows, no transition.
        manager.step = first_step + 1
        start = timer.mark()
        manager.train_step()
        if i >= UNTIMED_STEPS:
            step_spans.append((start, timer.mark()))
    manager.optimizer = optimizer.optimizer
    step_ms = [timer.elapsed_ms(a, b) for a, b in step_spans]
    optimizer_ms = [timer.elapsed_ms(a, b) for a, b in optimizer.spans[UNTIMED_STEPS:]]
    return statistics.median(step_ms), statistics.median(optimizer_ms)


def profile_last_stage(manager, steps=3, rows=25):
    """torch.profiler over a few steps of the run's largest stage: the kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if manager.device.kind == "cuda":
        activities.append(ProfilerActivity.CUDA)
    first, _ = manager.schedule.stages()[-1]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            manager.step = first + 1
            manager.train_step()
        if manager.device.kind == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if manager.device.kind == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def run_benchmark(manager, profile=False):
    """Time every stage; print the table, write the JSON; with ``profile``, also print where
    the device time of the largest stage goes. Returns the exit status 0."""
    log = manager.logger.print
    cuda = manager.device.kind == "cuda"
    compile_s = manager.warmup() if manager.config["compile_config"]["enabled"] else 0.0
    timer = StepTimer(cuda)
    steps = manager.config["training_config"]["benchmark_steps"]
    schedule, model = manager.schedule, manager.model
    rows = []
    for first, end in schedule.stages():
        if end - first < 2:
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        manager.apply_schedule(first)  # windows (YaRN) and untying as the run would have them
        step_ms, optimizer_ms = time_stage(manager, first, steps, timer)
        tokens = schedule.tokens(first)
        short, long = schedule.windows(first)
        flops = model.flops_per_token(schedule.micro_batch_tokens, (short, long)) * tokens
        row = {"stage": len(rows) + 1, "steps": f"{first}-{end - 1}", "tokens_per_step": tokens,
               "accumulation": schedule.accumulation_steps(first), "windows": f"{short}/{long}",
               "ms_per_step": step_ms, "tokens_per_s": tokens / step_ms * 1000,
               "tflops": flops / step_ms / 1e9, "optimizer_ms": optimizer_ms,
               "optimizer_share": optimizer_ms / step_ms, "mfu": None,
               "peak_allocated_gb": None, "peak_reserved_gb": None}
        if manager.device.peak_tflops:
            row["mfu"] = row["tflops"] / (manager.device.peak_tflops * manager.world.world_size)
        if cuda:
            row["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
            row["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        rows.append(row)
    result = {"device": manager.device.name, "world_size": manager.world.world_size,
              "torch": torch.__version__,
              "compile_and_warmup_s": compile_s, "timed_steps_per_stage": steps,
              "micro_batch_tokens": schedule.micro_batch_tokens, "stages": rows}
    for line in format_table(result):
        log(line)
    if manager.world.is_main:
        path = manager.logger.path.with_name(manager.logger.path.stem + "_benchmark.json")
        path.write_text(json.dumps(result, indent=1))
        log(f"benchmark written: {path}")
    if profile:
        log(profile_last_stage(manager))
    return 0


def format_table(result):
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    yield (f"benchmark on {result['world_size']} x {result['device']} (torch "
           f"{result['torch']}), medians of "
           f"{result['timed_steps_per_stage']} steps, micro-batch "
           f"{result['micro_batch_tokens']:,} tokens, compile + warm-up "
           f"{result['compile_and_warmup_s']:.0f}s")
    yield (f"{'stage':>5} {'steps':>11} {'tokens':>8} {'win':>6} {'ms/step':>8} "
           f"{'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'opt':>6} {'alloc GB':>9} "
           f"{'resv GB':>8}")
    for r in result["stages"]:
        yield (f"{r['stage']:>5} {r['steps']:>11} {r['tokens_per_step']:>8,} "
               f"{r['windows']:>6} {r['ms_per_step']:>8.1f} {r['tokens_per_s']:>10,.0f} "
               f"{r['tflops']:>8.1f} {cell(r['mfu'], '>6.1%')} "
               f"{r['optimizer_share']:>6.1%} {cell(r['peak_allocated_gb'], '>9.1f')} "
               f"{cell(r['peak_reserved_gb'], '>8.1f')}")


# ----------------------------------------------------------------------------------------------
# FlexAttention kernel options: `python3 benchmark.py --attention VAL_PATTERN` times forward and
# forward + backward of one micro-batch's attention (real document boundaries from the val
# shards, the base config's shapes and windows) under each candidate below, checks each
# against inductor's default choice, and prints a table. On the H100 no candidate beat the
# default (README, Speed), so the model passes no kernel options.

ATTENTION_CANDIDATES = {
    "default": {},
    "fwd 128x64 w8 s3": dict(fwd_BLOCK_M=128, fwd_BLOCK_N=64, fwd_num_warps=8, fwd_num_stages=3),
    "fwd 128x128 w8 s2": dict(fwd_BLOCK_M=128, fwd_BLOCK_N=128, fwd_num_warps=8,
                              fwd_num_stages=2),
    "fwd 64x128 w4 s3": dict(fwd_BLOCK_M=64, fwd_BLOCK_N=128, fwd_num_warps=4, fwd_num_stages=3),
    "bwd 64x128 w8 s3": dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128,
                             bwd_BLOCK_N2=64, bwd_num_warps=8, bwd_num_stages=3),
    "bwd 64x64 w4 s3": dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64,
                            bwd_num_warps=4, bwd_num_stages=3),
    "bwd 32x128 w4 s3": dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128,
                             bwd_BLOCK_N2=32, bwd_num_warps=4, bwd_num_stages=3),
    "bwd 64x128 w8 s2": dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128,
                             bwd_BLOCK_N2=64, bwd_num_warps=8, bwd_num_stages=2),
}


def attention_sweep(val_pattern, windows=(1, 3, 5, 11), rep_ms=200):
    """Rows of (name, window in blocks, forward ms, forward + backward ms, largest relative
    error of output and gradients against the default's)."""
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import flex_attention
    from triton.testing import do_bench

    import config.base as base
    import model as M
    from data.loader import val_batches

    mc, tc = base.model_config, base.training_config
    tokens = tc["batch_size_multiple"] * tc["max_seq_len"]
    inputs, _ = val_batches(val_pattern, tokens, tokens, tc["max_seq_len"], "cuda")[0]
    docs = M.document_ids(inputs)
    # (1, T, H, D) seen as (1, H, T, D), the model's layout; unit-RMS rows like its normed q
    # and k, q carrying the attention scale
    shape = (1, tokens, mc["num_heads"], mc["head_dim"])
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", generator=g) for _ in range(3))
    q = (q * mc["attn_scale"]).bfloat16().requires_grad_()
    k, v = k.bfloat16().requires_grad_(), v.bfloat16().requires_grad_()
    grad_out = torch.randn(shape, device="cuda", generator=g).bfloat16().transpose(1, 2)
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
    rows, reference = [], {}
    for name, options in ATTENTION_CANDIDATES.items():
        attend = torch.compile(flex_attention, fullgraph=True, dynamic=False)
        for window in windows:
            mask = M.block_attention_masks(docs, (window,), mc["block_size"])[0]

            def forward(mask=mask, options=options, attend=attend):
                return attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              block_mask=mask, scale=1.0, kernel_options=options)

            def forward_backward(forward=forward):
                return torch.autograd.grad(forward(), (q, k, v), grad_out)

            try:
                outputs = (forward().detach(), *forward_backward())
            except Exception as exc:  # a config the compiler rejects (shared memory, divisibility)
                rows.append((name, window, None, None, type(exc).__name__))
                continue
            reference.setdefault(window, outputs)
            error = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                        for a, b in zip(outputs, reference[window], strict=True))
            rows.append((name, window,
                         do_bench(forward, rep=rep_ms, return_mode="median"),
                         do_bench(forward_backward, rep=rep_ms, return_mode="median"),
                         error))
    return rows


def main(argv=None):
    import argparse

    import utils

    parser = argparse.ArgumentParser(description="Time FlexAttention kernel options")
    parser.add_argument("--attention", metavar="VAL_PATTERN", required=True,
                        help="val shard pattern whose first micro-batch gives the documents")
    args = parser.parse_args(argv)
    utils.setup_environment()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    print(f"{'candidate':<20} {'win':>5} {'fwd ms':>7} {'fwd+bwd ms':>10} {'rel err':>8}")
    for name, win, fwd, total, error in attention_sweep(args.attention):
        if fwd is None:
            print(f"{name:<20} {win:>5} failed: {error}")
        else:
            print(f"{name:<20} {win:>5} {fwd:>7.3f} {total:>10.3f} {error:>8.1e}")


if __name__ == "__main__":
    main()
