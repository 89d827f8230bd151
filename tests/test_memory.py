"""memory.py and run.fit_micro_batch: the micro-batch chosen for a card's memory, on stand-in
devices (no GPU needed); MAX_GPU_MEMORY_GB on a stand-in for torch.cuda."""

import types

import pytest
import torch

import memory
import run
import utils
from model import build_model
from optimizers import build_optimizer

HOPPER = utils.DeviceInfo("cuda", "Stand-in H100", "hopper", (9, 0), 232448, 989.0)
AMPERE = utils.DeviceInfo("cuda", "Stand-in A100", "ampere", (8, 0), 166912, 312.0)


def repo_config(name):
    return run.build_config(run.load_config(utils.REPO_ROOT / "config" / f"{name}.py"))


def record55_config():
    """The config the bytes per unit were measured on."""
    return repo_config("record55")


@pytest.mark.parametrize("name", ["cpu", "record55"])
def test_state_bytes_count_real_tensors(name):
    config = repo_config(name)
    model = build_model(config.model)
    optimizer = build_optimizer(model, config.optimizer)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    tensors = [*model.parameters(), *(p.grad for p in model.parameters()),
               *(v for entry in optimizer.state_dict()["params"]
                 for v in entry["state"].values() if torch.is_tensor(v))]
    assert memory.state_bytes(config.model, config.optimizer) == sum(
        t.numel() * t.element_size() for t in tensors)


def test_the_ngram_tables_micro_batch_gradient_is_counted():
    """config/record92.py's n-gram table: its weights, .grad and a micro-batch's dense
    gradient (three table sizes in bf16) and one float32 second moment a row; or, with
    ngram_row_grads, its weights, second moments and the held gradient rows."""
    config = repo_config("record92")
    assert config.model.ngram_bf16
    rows, dim = config.model.bigram_rows, config.model.model_dim
    raw = run.load_config(utils.REPO_ROOT / "config" / "record92.py")
    raw["model_config"].update(ngram_table=False, ngram_bf16=False, bigram_rows=0)
    raw["training_config"]["ngram_row_grads"] = False
    without = run.build_config(raw)
    table = memory.state_bytes(config.model, config.optimizer) - memory.state_bytes(
        without.model, without.optimizer)
    assert table == 3 * rows * dim * 2 + rows * 4
    # with its gradient kept as rows: the weights, and room for the rows of four steps of
    # 393,216 tokens (two a token) and their int64 ids
    held = config.schedule.rows_between_table_steps()
    assert held == 2 * 393_216 * 4
    table = memory.state_bytes(config.model, config.optimizer, held) - memory.state_bytes(
        without.model, without.optimizer)
    assert table == rows * dim * 2 + rows * 4 + held * (dim * 2 + 8)


def test_base_on_a_card_too_small_names_its_table_and_record89():
    """config/base.py (record #92's) fits an H100 at its own micro-batch; its state
    alone (its quarter-size n-gram table) exceeds a 48 GB card: the error names the key that
    makes it smaller and the config for such a card."""
    config = repo_config("base")
    assert config.raw == repo_config("record92").raw
    assert memory.choose_multiple(config, HOPPER, 79.6 * 2**30)[0] == 32  # an H100's 79.6 GiB
    with pytest.raises(utils.ConfigError, match=f"n-gram table, {config.model.bigram_rows:,} "
                                                "rows, takes most: a smaller model_config"
                                                ".bigram_rows, or config/record89.py"):
        memory.choose_multiple(config, HOPPER, 48 * memory.GB)


@pytest.mark.parametrize("gb,multiple", [(24, 16), (32, 16), (48, 32), (80, 32), (12, None)])
def test_the_largest_micro_batch_that_fits_is_chosen(gb, multiple):
    config = record55_config()
    if multiple is None:  # validation needs micro-batches of 8 x 2048 at least
        with pytest.raises(utils.ConfigError, match="the smallest, BATCH_SIZE_MULTIPLE=8 .* "
                                                    "lower val_chunk_tokens"):
            memory.choose_multiple(config, HOPPER, gb * memory.GB)
        return
    chosen, estimate = memory.choose_multiple(config, HOPPER, gb * memory.GB)
    assert chosen == multiple
    assert estimate == memory.peak_bytes(config, HOPPER, chosen) <= 0.85 * gb * memory.GB
    larger = [m for m in memory.fitting_multiples(config, 1) if m > chosen]
    assert all(memory.peak_bytes(config, HOPPER, m) > 0.85 * gb * memory.GB for m in larger)


def test_record89_estimate_is_its_measured_peak():
    # record #89 on the H100: 40.2 GB allocated at 32 x 2048 with float8, 9.9 GB of it state
    config = repo_config("record89")
    assert memory.state_bytes(config.model, config.optimizer) / memory.GB == pytest.approx(
        9.87, abs=0.01)
    assert memory.peak_bytes(config, HOPPER, 32) / memory.GB == pytest.approx(40.2, abs=0.05)
    assert memory.peak_bytes(config, AMPERE, 32) > memory.peak_bytes(config, HOPPER, 32)
    choices = {gb: memory.choose_multiple(config, device, gb * memory.GB)[0]
               for gb, device in [(24, HOPPER), (32, HOPPER), (48, HOPPER), (80, HOPPER)]}
    assert choices == {24: 8, 32: 16, 48: 32, 80: 32}
    assert memory.choose_multiple(config, AMPERE, 24 * memory.GB)[0] == 8
    assert memory.choose_multiple(config, AMPERE, 40 * memory.GB)[0] == 16


def test_estimates_grow_with_the_micro_batch_and_without_float8():
    config = record55_config()
    peaks = [memory.peak_bytes(config, HOPPER, m) for m in (1, 2, 4, 8, 16, 32)]
    assert peaks == sorted(peaks) and peaks[0] > memory.state_bytes(config.model, config.optimizer)
    # the measured point it was scaled from: 31.0 GB at 65,536 tokens with float8
    assert peaks[-1] / memory.GB == pytest.approx(31.0, abs=0.05)
    assert memory.peak_bytes(config, AMPERE, 32) / memory.GB == pytest.approx(33.4, abs=0.05)
    # 38 GB leaves 32.3 GB to the estimate: enough for 65,536 tokens with float8 only
    assert memory.choose_multiple(config, HOPPER, 38 * memory.GB)[0] == 32
    assert memory.choose_multiple(config, AMPERE, 38 * memory.GB)[0] == 16
    with pytest.raises(utils.ConfigError, match="no micro-batch fits 4.0 GB of Stand-in A100: "
                                                "the smallest, BATCH_SIZE_MULTIPLE=8"):
        memory.choose_multiple(config, AMPERE, 4 * memory.GB)


def test_only_multiples_that_divide_every_stage_and_the_processes(tmp_path):
    config = repo_config("record89")
    # validation's chunks of 262,144 tokens go in micro-batches each behind 11,392 tokens of
    # context: 4 x 2048 would score none
    assert memory.fitting_multiples(config, 1) == [32, 16, 8]
    assert memory.fitting_multiples(config, 4) == [16, 8]
    chunked = run.build_config(dict(config.raw, training_config=dict(
        config.raw["training_config"], val_chunk_tokens=2048)))
    assert memory.fitting_multiples(chunked, 1) == [32, 16, 8, 4, 2, 1]


def test_fit_replaces_the_micro_batch_and_keeps_the_tokens(monkeypatch):
    config = record55_config()
    monkeypatch.setattr(memory, "memory_limit", lambda device, index, environ: 24 * memory.GB)
    world = types.SimpleNamespace(local_rank=0, world_size=1)
    fitted, note = run.fit_micro_batch(config, HOPPER, world, {"MAX_GPU_MEMORY_GB": "24"}, True)
    assert fitted.training.batch_size_multiple == 16
    assert fitted.raw["training_config"]["batch_size_multiple"] == 16  # the record says so
    assert config.raw["training_config"]["batch_size_multiple"] == 32
    for step in (0, 700, 1300, 1844):
        before, after = config.schedule.at(step), fitted.schedule.at(step)
        assert after.tokens == before.tokens and after.accumulation == 2 * before.accumulation
    assert note.startswith("micro-batch 16 x 2048 = 32,768 tokens: the largest up to the "
                           "config's 32 x 2048 whose estimated peak, 17.5 GB, fits 24.0 GB "
                           "(MAX_GPU_MEMORY_GB of Stand-in H100)")
    kept, note = run.fit_micro_batch(config, HOPPER, world, {}, False)
    assert kept is config and "set by hand" in note


def test_the_micro_batch_is_chosen_unless_set(tmp_path):
    def chosen(argv, environ):
        args, _ = run.resolve_config(["--config", "config/cpu.py", *argv], environ)
        return not args.micro_batch_set

    assert chosen([], {})
    assert not chosen([], {"BATCH_SIZE_MULTIPLE": "1"})
    assert not chosen(["--batch_size_multiple", "1"], {})
    assert not chosen(["--training_config.batch_size_multiple", "1"], {})


def test_max_gpu_memory_caps_the_process(monkeypatch):
    fractions = []
    props = types.SimpleNamespace(total_memory=80 * memory.GB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, index: fractions.append((fraction, index)))
    assert memory.memory_limit(HOPPER, 0, {}) == 80 * memory.GB and fractions == []
    assert memory.memory_limit(HOPPER, 1, {"MAX_GPU_MEMORY_GB": "24"}) == 24 * memory.GB
    assert fractions == [(pytest.approx(0.3), 1)]
    for bad in ("0", "-5", "81", "lots"):
        with pytest.raises(utils.ConfigError, match="MAX_GPU_MEMORY_GB must be a number of GB "
                                                    r"in \(0, 80.0\]"):
            memory.memory_limit(HOPPER, 0, {"MAX_GPU_MEMORY_GB": bad})
