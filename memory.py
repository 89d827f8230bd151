"""The micro-batch that fits the GPU: the tokens per step stay the config's, only how many
micro-batches make them up changes (gradient accumulation).

A training step's peak memory is the run's state, the same at any micro-batch (float32 weights
and their gradients, the optimizer's state: counted exactly on a model and optimizer built on
the meta device), plus what a micro-batch keeps for its backward pass, in proportion to its
tokens. That second part is estimated per token as ``bytes_per_unit`` x (num_layers x
(model_dim + ffn_dim) + padded vocabulary): the residual stream and the MLP's activations of
every layer, and the row of logits' gradient that the lm_head's loss op writes. The bytes per
unit are measured for each model (record #89's, config/record89.py; record #55's,
config/record55.py) on an H100: peak memory allocated less the state, per token and unit
(README, Any card from 24 to 80 GB). The caching
allocator reserves more than it allocates, so the estimate must fit within ``HEADROOM`` of the
memory.

``MAX_GPU_MEMORY_GB`` caps the memory the process may use
(``torch.cuda.set_per_process_memory_fraction``): a smaller card, simulated on a larger one.
"""

import math

from utils import ConfigError

GB = 1e9
# The allocator's slack: on the H100 record #55 reserved 36.3 GB for 31.0 allocated; record
# #89 48.4 GB for 40.2, and under a 48 GB cap 47.6 (it frees cached blocks before failing)
HEADROOM = 0.85
# Bytes a micro-batch keeps per token and unit, by model config and by whether the float8
# matmuls run: peak allocated on an H100 less the run's state, per token of the micro-batch.
BYTES_PER_UNIT = {
    # record #55 at 65,536 tokens: 31.0 GB with float8 (commit 4c8854c), 33.4 GB without
    # (commit 945d126 with the bf16 residual stream), state 4.0 GB
    "Record55Config": {True: (31.0 - 4.0) * GB / 65_536 / 92_544,
                       False: (33.4 - 4.0) * GB / 65_536 / 92_544},
    # record #89 with float8 at 65,536 tokens: 40.2 GB (2026-12-06), state 9.9 GB; without
    # float8 at 32,768 tokens: 26.4 GB (2026-12-06, as record #55's ratio had predicted)
    "GPTConfig": {True: (40.2 - 9.9) * GB / 65_536 / 92_544,
                  False: (26.4 - 9.9) * GB / 32_768 / 92_544},
}


def state_bytes(model_config, optimizer_config, row_grads: int = 0) -> int:
    """Weights, gradients and optimizer state of the run, in bytes (and the n-gram table's
    gradient of a micro-batch); with ``row_grads`` (training_config.ngram_row_grads) the table
    has no gradient of its size, but room for that many gradient rows and their ids."""
    import torch

    from model import build_model
    from optimizers import build_optimizer

    with torch.device("meta"):
        model = build_model(model_config)
        optimizer = build_optimizer(model, optimizer_config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(value.numel() * value.element_size() for entry in optimizer.state_dict()["params"]
                for value in entry["state"].values() if torch.is_tensor(value))
    # the n-gram table's dense gradient of a micro-batch, beside its .grad until added to it:
    # the bytes per unit were measured with record #89's small bigram table, whose share of
    # this is in them
    tables = [p for p in model.parameters() if getattr(p, "row_adam", False)]
    table_bytes = sum(p.numel() * p.element_size() for p in tables)
    if not row_grads:
        return 2 * weights + state + table_bytes
    rows = sum(row_grads * (p.size(1) * p.element_size() + 8) for p in tables)
    return 2 * weights - table_bytes + state + rows


def activation_bytes_per_token(model_config, fp8: bool) -> float:
    c = model_config
    units = c.num_layers * (c.model_dim + c.ffn_dim) + c.padded_vocab
    return BYTES_PER_UNIT[type(model_config).__name__][fp8] * units


def uses_fp8(model_config, device) -> bool:
    """Whether the float8 matmuls run: asked for, and the GPU has them (capability >= 8.9)."""
    asked = (model_config.fp8_mlp or model_config.fp8_lm_head
             or getattr(model_config, "fp8_attn", False))
    return asked and tuple(device.capability) >= (8, 9)


def peak_bytes(config, device, multiple: int) -> float:
    """The estimated peak memory of a step with micro-batches of ``multiple`` x max_seq_len."""
    tokens = multiple * config.training.max_seq_len
    row_grads = (config.schedule.rows_between_table_steps() if config.training.ngram_row_grads
                 else 0)
    return (state_bytes(config.model, config.optimizer, row_grads)
            + tokens * activation_bytes_per_token(config.model, uses_fp8(config.model, device)))


def fitting_multiples(config, world_size: int) -> list[int]:
    """The batch size multiples up to the config's that divide every stage's tokens among the
    processes and take a validation chunk (``train.validation_fits``), largest first."""
    from train import validation_context, validation_fits

    tc = config.training
    context = validation_context(config.model, config.schedule)
    return [m for m in range(tc.batch_size_multiple, 0, -1)
            if not any(s.tokens % (m * tc.max_seq_len * world_size)
                       for s in config.schedule.stages_table)
            and validation_fits(tc.val_chunk_tokens, m * tc.max_seq_len, context)]


def choose_multiple(config, device, memory: float, world_size: int = 1) -> tuple[int, float]:
    """The largest batch size multiple whose estimated peak fits ``HEADROOM`` of ``memory``
    bytes, and that estimate; a ConfigError when not even the smallest fits."""
    candidates = fitting_multiples(config, world_size)
    for multiple in candidates:
        estimate = peak_bytes(config, device, multiple)
        if estimate <= HEADROOM * memory:
            return multiple, estimate
    smallest = candidates[-1]
    table = (f" (its n-gram table, {config.model.bigram_rows:,} rows, takes most: a smaller "
             f"model_config.bigram_rows, or config/record89.py, record #89's recipe without "
             f"it)" if getattr(config.model, "ngram_table", False) else "")
    raise ConfigError(
        f"no micro-batch fits {memory / GB:.1f} GB of {device.name}: the smallest, "
        f"BATCH_SIZE_MULTIPLE={smallest} ({smallest * config.training.max_seq_len:,} tokens), "
        f"needs about {peak_bytes(config, device, smallest) / GB:.1f} GB (with "
        f"{1 - HEADROOM:.0%} left to the allocator): use a smaller model{table} or a larger "
        f"GPU, or lower val_chunk_tokens to let smaller micro-batches validate")


def memory_limit(device, index: int, environ) -> float:
    """Bytes this process may use on GPU ``index``: the card's, or MAX_GPU_MEMORY_GB's cap,
    which is then applied to the process (the caching allocator raises out-of-memory past
    it)."""
    import torch

    total = torch.cuda.get_device_properties(index).total_memory
    text = environ.get("MAX_GPU_MEMORY_GB")
    if not text:
        return total
    try:
        cap = float(text) * GB
    except ValueError:
        cap = math.nan
    if not 0 < cap <= total:
        raise ConfigError(f"MAX_GPU_MEMORY_GB must be a number of GB in (0, "
                          f"{total / GB:.1f}] (the memory of {device.name}), got '{text}'")
    torch.cuda.set_per_process_memory_fraction(cap / total, index)
    return cap
