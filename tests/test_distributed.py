"""Several processes (torchrun's world) on the CPU with gloo: the same math as one process.

Two ranks start from torch.multiprocessing (gloo on a free local port) or, end to end, from
torchrun itself. A 1-rank and a 2-rank run of a config differ only in the order of float sums:
each rank sums its micro-batches' gradients, then the ranks average theirs, where one process
sums all in a row. The loss sees that as rounding (relative 1e-6 after a few steps). Weights
see more: Adam normalises every gradient entry by its own scale, so an entry that nearly cancels
takes a full lr step whose size the rounding decides (value embeddings step 0.6 at a time), and
NorMuon's bf16 Polar Express turns a one-ulp difference of its input into a bf16-level
difference of the whole update: after 8 steps the weights differ by a few % of how far training
moved them (by 1e-4 of it with the orthogonalisation in fp32). So the weight comparison trains
with BAM (no bf16) and Adam's eps raised from 1e-10 to 1e-6 (an entry whose gradient nearly
cancels then moves by about g / eps, not by a full lr step whose sign the rounding decides:
with 1e-10, a dozen such entries of the lm_head put it 5e-3 of its move apart on one CPU and
not on another), and compares, per tensor as a norm, the runs' difference with how far the
tensor moved: below 1e-3 of it (measured up to 3e-5 for weights and 1.5e-4 for the Adam moment
of a scalar whose gradient largely cancels, on the record #89 model). NorMuon's sharded step
is compared with its unsharded step directly, on the same gradients, where it agrees to float
precision.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_record92_model_config
from test_train import CPU, tiny_config, write_tiny_shards

import run
import train
import utils
from distributed import World
from optimizers import MATRIX_OPTIMIZERS, OptimizerConfig, build_optimizer

WORLD_SIZE = 2
STEPS = 8  # crosses the batch and window transition (4), the scalar freeze and the untie (6)
# Two runs' weights differ by less than this share of how far training moved them.
MOVED_SHARE = 1e-3


def with_tokens(config, *tokens):
    """The config's stage table with these tokens per step, row by row."""
    config["schedule"]["stages"] = tuple(dict(stage, tokens=t) for stage, t in
                                         zip(config["schedule"]["stages"], tokens, strict=True))
    return config


def two_rank_config(folder, data_dir):
    """The tiny config with 4 and 8 micro-batches of 128 tokens a step: 2 and 4 per rank, Adam
    on the odd steps (so checkpoints after odd step counts hold gradients for it), and the
    sampled softmax over 512 candidates until step 6, a set per 64 rows (each rank builds its
    own groups' sets: the one rank's), the embedding tables' Adam on steps 3 mod 4 from step 4
    (their gradients held over two Adam steps, unreduced until theirs), and attention in
    segments of at most 24 tokens."""
    config = with_tokens(tiny_config(folder, data_dir), 512, 1024, 1024, 1024)
    config["training_config"]["val_tokens"] = 512
    config["schedule"].update(adam_every=2, sampled_softmax=((0, 512), (6, 0)),
                              sampled_softmax_rows=64, table_adam_every=4, table_adam_from=4,
                              attention_segment_cap=24)
    return config


def short_run_config(folder, data_dir):
    """A full run in 6 + 1 steps: stages at steps 2 and 4, untie at 3; validation at 5 and 7;
    record #92's model with its n-gram table (row-wise Adam), its gradient kept as rows (each
    rank's gathered at the table's steps; a checkpoint's the mean over the ranks)."""
    config = two_rank_config(folder, data_dir)
    config["schedule"].update(num_scheduled_iterations=6, num_extension_iterations=1)
    config["model_config"] = dict(tiny_record92_model_config(), prefix_prediction=False)
    config["training_config"]["ngram_row_grads"] = True
    return config


def manager(config, world=None):
    return train.TrainingManager(run.build_config(config, world.world_size if world else 1),
                                 CPU, world=world)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_world(rank, port):
    """What torchrun does for a rank: the environment, then World.from_env and init."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)  # two ranks on two cores
    world = World.from_env()
    world.init("cpu")
    return world


def spawn(worker, *args, timeout=240):
    """Run worker(rank, port, *args) on two ranks; a rank's exception fails the test."""
    context = mp.spawn(worker, args=(free_port(), *args), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} did not finish in {timeout}s")


def weights(manager):
    return {k: v.detach().clone() for k, v in manager.model.named_parameters()}


def assert_moved_alike(got, expected, start):
    """Every tensor of ``got`` is ``expected`` up to MOVED_SHARE of its way from ``start``."""
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        moved = (value - start[name]).norm()
        assert moved > 0, name
        share = ((got[name] - value).norm() / moved).item()
        assert share < MOVED_SHARE, f"{name}: differs by {share:.1e} of its move"


# -- in-process ranks: training and the sharded optimizer -----------------------------------------

# Shape groups of 3 + 2 + 1 = 6 matrices and of 1: with two ranks, uneven shares and an empty
# one.
SHAPES = {"a": ((3, 8, 16), "attn"), "b": ((16, 8), "mlp"), "c": ((2, 8, 16), "mlp"),
          "e": ((10, 4), "embed"), "s": ((3,), "scalar"), "d": ((8, 16), "mlp")}


def labelled(tensor, label):
    param = torch.nn.Parameter(tensor)
    param.label = label
    return param


def optimize(method, world=None, rank=None):
    """Four steps; the gradients are ``rank``'s share, or with no rank their mean over the
    ranks. Returns the weights and the full optimizer state."""
    g = torch.Generator().manual_seed(1)
    params = {n: labelled(torch.randn(shape, generator=g), label)
              for n, (shape, label) in SHAPES.items()}
    config = dict(run.load_config(utils.REPO_ROOT / "config" / "cpu.py")["optimizer_config"],
                  matrix_optimizer=method)
    optimizer = build_optimizer(list(params.items()), OptimizerConfig.from_dict(config), world)
    for _ in range(4):
        for p in params.values():
            grads = [torch.randn(p.shape, generator=g) for _ in range(WORLD_SIZE)]
            p.grad = (grads[0] + grads[1]) / 2 if rank is None else grads[rank]
        optimizer.step()
    return {n: p.detach().clone() for n, p in params.items()}, optimizer.state_dict()


def two_rank_work(rank, port, config, folder):
    """Everything the in-process tests need from two ranks, in one spawn (start-up dominates):
    STEPS fresh steps, a resume of the 1-rank checkpoint of step 3, the sharded optimizers.
    The two ranks add the tables' gradients in place (training_config.table_grads_in_place),
    the one rank leaves them to autograd: the same sums."""
    config = dict(config, training_config=dict(config["training_config"],
                                               table_grads_in_place=True))
    world = join_world(rank, port)
    try:
        fresh = manager(config, world)
        losses = [fresh.train_step().item() for _ in range(STEPS)]
        val_loss = fresh.validate()
        resumed = manager(config, world)
        resumed.load_checkpoint(folder / "one_rank_step3.pt")
        resumed_losses = [resumed.train_step().item() for _ in range(STEPS - 3)]
        assert fresh.table_grads and resumed.table_grads
        # state_dict() gathers every rank's share of the matrix state: all ranks call it.
        result = dict(losses=losses, val_loss=val_loss, weights=weights(fresh),
                      optimizer=fresh.optimizer.state_dict(), resumed_losses=resumed_losses,
                      resumed_weights=weights(resumed),
                      sharded={m: optimize(m, world, rank) for m in MATRIX_OPTIMIZERS})
        if world.is_main:
            torch.save(result, folder / "two_ranks.pt")
    finally:
        world.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """STEPS steps of the tiny config with BAM on one rank (here) and on two (spawned); the two
    ranks also resume a 1-rank checkpoint of step 3."""
    folder = tmp_path_factory.mktemp("two_ranks")
    config = two_rank_config(folder, write_tiny_shards(folder))
    config["optimizer_config"]["matrix_optimizer"] = "bam"
    for section in ("adam", "scalar_adam"):
        config["optimizer_config"][section]["eps"] = 1e-6
    one = manager(config)
    initial = weights(one)
    losses = []
    for step in range(STEPS):
        if step == 3:
            one.save_checkpoint(folder / "one_rank_step3.pt")
        losses.append(one.train_step().item())
    reference = dict(losses=losses, val_loss=one.validate(), weights=weights(one),
                     optimizer=one.optimizer.state_dict(), initial=initial)
    spawn(two_rank_work, config, folder)
    return reference, torch.load(folder / "two_ranks.pt", weights_only=False)


def test_two_ranks_follow_the_one_rank_run(runs):
    one, two = runs
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert_moved_alike(two["weights"], one["weights"], one["initial"])
    # The optimizer state, each rank's share of it gathered, is the 1-rank run's.
    for got, expected in zip(two["optimizer"]["params"], one["optimizer"]["params"],
                             strict=True):
        assert got["name"] == expected["name"]
        tensors = {k: v for k, v in expected["state"].items() if torch.is_tensor(v)}
        assert got["state"].keys() == expected["state"].keys()
        assert all(got["state"][k] == v for k, v in expected["state"].items() if k not in tensors)
        assert_moved_alike({k: got["state"][k] for k in tensors}, tensors,
                           {k: torch.zeros_like(v) for k, v in tensors.items()})


def test_one_rank_checkpoint_resumes_on_two_ranks(runs):
    one, two = runs
    assert two["resumed_losses"] == pytest.approx(one["losses"][3:], rel=1e-5)
    assert_moved_alike(two["resumed_weights"], one["weights"], one["initial"])


@pytest.mark.parametrize("method", MATRIX_OPTIMIZERS)
def test_sharded_matrix_step_equals_the_unsharded_one(runs, method):
    expected_weights, expected_state = optimize(method)
    got_weights, got_state = runs[1]["sharded"][method]
    for name, value in expected_weights.items():
        torch.testing.assert_close(got_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for got, expected in zip(got_state["params"], expected_state["params"], strict=True):
        for key, value in expected["state"].items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6,
                                       msg=f"{expected['name']} {key}")


# -- run.py under torchrun, end to end ----------------------------------------------------------


def write_config_module(path, config):
    """run.py takes a config file: ``config`` written as a module of literals."""
    path.write_text("".join(f"{section} = {value!r}\n" for section, value in config.items()))
    return path


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """A short full run (checkpoints every 3 steps) under torchrun, on two ranks."""
    folder = tmp_path_factory.mktemp("torchrun")
    data_dir = write_tiny_shards(folder)
    config = short_run_config(folder / "run", data_dir)
    config["training_config"]["checkpoint_every"] = 3
    path = write_config_module(folder / "two_ranks.py", config)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(WORLD_SIZE), "run.py", "--config", str(path)],
        cwd=utils.REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return config, folder / "run", result.stdout, data_dir


def test_torchrun_run_is_the_one_process_run(torchrun_run, tmp_path):
    config, folder, stdout, data_dir = torchrun_run
    # Rank 0 alone prints, logs and writes the record (and checkpoints, below).
    assert stdout.count("step 1/7 ") == 1 and stdout.count("final val_loss") == 1
    (log,) = (folder / "logs").iterdir()
    assert log.read_text().count("step 1/7 ") == 1
    (record,) = (folder / "records").glob("*/*.json")
    figures = json.loads(record.read_text())
    assert figures["world_size"] == WORLD_SIZE and figures["gpu_count"] == 0
    assert "world size 2 (2 x cpu)" in record.with_suffix(".txt").read_text()
    assert run.run(run.build_config(short_run_config(tmp_path, data_dir))) == 0
    (one_record,) = (tmp_path / "records").glob("*/*.json")
    one_figures = json.loads(one_record.read_text())
    assert one_figures["world_size"] == 1
    assert (figures["steps"], figures["tokens"]) == (one_figures["steps"], one_figures["tokens"])
    assert figures["val_loss"] == pytest.approx(one_figures["val_loss"], rel=1e-5)


def test_torchrun_checkpoint_resumes_in_one_process(torchrun_run):
    config, folder, _, _ = torchrun_run
    (log,) = (folder / "logs").iterdir()
    assert sorted(p.name for p in (folder / "ckpt").iterdir()) == [
        f"cpu_{log.stem[:8]}_{name}.safetensors" for name in ("model", "step000003",
                                                               "step000006")]
    uninterrupted = manager(config)
    expected = [uninterrupted.train_step().item() for _ in range(6)]
    # the n-gram table's second moments after step 6: the two ranks' rows gathered and averaged
    # (their sum would make these four times as large, which Adam's scale-free steps hide);
    # each rank's bf16 rows summed in another order: measured up to 0.25% apart
    at_6 = manager(config)
    at_6.load_checkpoint(folder / "ckpt" / f"cpu_{log.stem[:8]}_step000006.safetensors")
    moments = [table_second_moment(m) for m in (at_6, uninterrupted)]
    assert moments[1].max() > 0
    torch.testing.assert_close(*moments, rtol=1e-2, atol=1e-12)
    expected.append(uninterrupted.train_step().item())
    resumed = manager(config)
    resumed.load_checkpoint(folder / "ckpt" / f"cpu_{log.stem[:8]}_step000003.safetensors")
    assert resumed.step == 3
    # two ranks sum the gradients in another order: measured up to 1.2e-5 apart
    assert [resumed.train_step().item() for _ in range(4)] == pytest.approx(expected[3:],
                                                                           rel=3e-5)


def table_second_moment(trainer):
    (entry,) = [p for p in trainer.optimizer.state_dict()["params"]
                if p["name"] == "bigram.table"]
    return entry["state"]["exp_avg_sq"]


# -- the world and its checks -------------------------------------------------------------------


def test_tokens_per_step_must_divide_among_the_ranks(tmp_path, capsys):
    config = two_rank_config(tmp_path, tmp_path)
    run.build_config(config, WORLD_SIZE)
    with_tokens(config, 384, 1024, 1024, 1024)  # three 128-token micro-batches
    run.build_config(config)
    with pytest.raises(utils.ConfigError, match=r"384 is not a multiple of the micro-batch "
                       r"\(128 = batch_size_multiple x max_seq_len, x 2 processes = 256 tokens\); "
                       r"lower BATCH_SIZE_MULTIPLE \(e.g. BATCH_SIZE_MULTIPLE=1\)"):
        run.build_config(config, WORLD_SIZE)
    with_tokens(config, 192, 1024, 1024, 1024)  # three 64-token sequences
    with pytest.raises(utils.ConfigError, match="no BATCH_SIZE_MULTIPLE fits: change the "
                       "schedule or the number of processes"):
        run.build_config(config, WORLD_SIZE)
    with_tokens(config, 512, 1024, 1024, 1024)
    config["training_config"]["val_tokens"] = 384
    with pytest.raises(utils.ConfigError, match=r"val_tokens \(384\) must be a positive multiple "
                       r"of val_chunk_tokens \(128\) x 2 processes"):
        run.build_config(config, WORLD_SIZE)
    config["training_config"].update(val_tokens=512, grad_clip_norm=1.0)
    with pytest.raises(utils.ConfigError, match="grad_clip_norm"):
        run.build_config(config, WORLD_SIZE)
    # run.py under torchrun: every rank exits 2 before any process group; rank 0 says why.
    config["training_config"]["grad_clip_norm"] = 0.0
    path = write_config_module(tmp_path / "config.py", config)
    for rank in range(WORLD_SIZE):
        environ = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                       BATCH_SIZE_MULTIPLE="8")  # 512-token micro-batches: 1,024 a round
        assert run.main(["--config", str(path)], environ) == 2
        error = capsys.readouterr().err
        assert ("lower BATCH_SIZE_MULTIPLE" in error) == (rank == 0)


def test_world_from_the_torchrun_environment():
    assert World.from_env({}) == World(rank=0, local_rank=0, world_size=1)
    assert World().is_main and not World().distributed
    world = World.from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (world.rank, world.local_rank, world.world_size) == (3, 1, 4)
    assert world.distributed and not world.is_main
    tensor = torch.ones(2)
    assert World().all_reduce_mean(tensor) is tensor and World().all_true(True, "cpu")


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(utils.ConfigError, match="needs GPU 1, but only 1 are visible"):
        utils.detect_device("cuda", 1)
