"""layers/ngram.py and its row-wise Adam against record #92's code (tests/reference/record92/
ngram.pt, README there): the hashes at the record's size, the sign rows, the looked-up sum, and
the optimizer's updates through the switch to its period-4 betas and decay."""

import copy

import pytest
import torch
from conftest import make_model, tokens

import run
from layers.ngram import NgramEmbedding, RowGradients, ngram_rows, sign_rows
from optimizers import OptimizerConfig, build_optimizer
from utils import REPO_ROOT, ConfigError

REFERENCE = torch.load(REPO_ROOT / "tests" / "reference" / "record92" / "ngram.pt",
                       weights_only=True)


@pytest.mark.parametrize("rows", ["84602880", "21150720", "4096"])
def test_hashes_are_the_records(rows):
    """Its full table, a quarter of it and a tiny one; the tokens include the large ids whose
    int32 products wrap, and ids near the start where the record's sentinels apply."""
    want = REFERENCE["hashes"][rows]
    assert torch.equal(ngram_rows(REFERENCE["tokens"], int(rows)).flatten(), want)


@pytest.mark.parametrize("signs", ["8192", "32"])
def test_sign_rows_are_the_records(signs):
    assert torch.equal(sign_rows(REFERENCE["tokens"], int(signs)), REFERENCE["sign_rows"][signs])


def test_the_lookup_sums_both_channels_signed():
    torch.manual_seed(0)
    table = NgramEmbedding(64, 8, 16)
    with torch.no_grad():
        table.table.normal_()
    x = tokens(40, doc_starts=(0, 17))
    ids, signs = ngram_rows(x, 64), sign_rows(x, 16)
    want = (table.table[ids[0]] * table.signs[signs[0]]
            + table.table[ids[1]] * table.signs[signs[1]])
    out = table(x, torch.float32)
    torch.testing.assert_close(out[0], want)
    out.sum().backward()
    touched = torch.zeros(64, dtype=torch.bool)
    touched[ids.flatten()] = True
    assert table.table.grad[~touched].abs().sum() == 0 and table.table.grad[touched].any()


@pytest.mark.parametrize("as_rows", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_adam_is_the_records(dtype, as_rows):
    """Eight updates of a 64-row table with rows left untouched at each (their gradient zero),
    the last four at the period-4 pace (betas squared, twice the decay): the same weights and
    per-row second moments as the record's n-gram Adam, in float32 and with bf16 weights and
    gradients as the record's (there within a bf16 step: its mean square is a sum / D). The
    gradient dense, or as rows (``RowGradients``: the touched rows alone, as training keeps
    them with ngram_row_grads)."""
    ref = REFERENCE["adam"]
    table = torch.nn.Parameter(ref["initial"].to(dtype, copy=True))
    table.label, table.row_adam = "bigram_embed", True
    if as_rows:
        table.row_grads = RowGradients(table, 64, 64)
    config = copy.deepcopy(run.load_config(REPO_ROOT / "config" / "record92.py")
                           ["optimizer_config"])
    config["adam"].update(lr=ref["lr"], eps=ref["eps"], weight_decay=ref["weight_decay"])
    config["label_lr_mul"]["bigram_embed"] = ref["label_lr_mul"]
    optimizer = build_optimizer([("table", table)], OptimizerConfig.from_dict(config))
    state = optimizer.state_dict()["params"][0]["state"]
    assert state["exp_avg"].numel() == 0 and state["exp_avg_sq"].shape == (64, 1)
    for event in range(8):
        pace = 2 if ref["beta2"][event] < 0.95 else 1
        assert config["label_betas"]["bigram_embed"][1] ** pace == ref["beta2"][event]
        assert config["label_wd_mul"]["bigram_embed"] * pace == ref["wd_mul"][event]
        optimizer.set_lr_factor(ref["lr_factor"][event].item())
        grad = ref["grads"][event].to(dtype, copy=True)
        if as_rows:
            touched = grad.any(-1).nonzero()[:, 0]
            assert touched.numel() < 64
            table.row_grads.load(touched, grad[touched])
        else:
            table.grad = grad
        optimizer.step(table_pace=pace)
    bf16 = dtype == torch.bfloat16
    assert table.dtype == dtype
    torch.testing.assert_close(table.detach().float(),
                               ref["final_bf16" if bf16 else "final"].float(),
                               rtol=8e-3 if bf16 else 1e-6, atol=1e-7)
    state = optimizer.state_dict()["params"][0]["state"]
    torch.testing.assert_close(state["exp_avg_sq"][:, 0],
                               ref["second_moment_bf16" if bf16 else "second_moment"],
                               rtol=1e-2 if bf16 else 1e-6, atol=0)


def test_the_model_takes_the_ngram_table(tiny_model_config):
    """With ngram_table the model's bigram slot holds the n-gram table (tests/test_model.py
    checks the receptive field and decoding with it); its gradients in place equal
    autograd's."""
    config = dict(tiny_model_config, ngram_table=True)
    gpt = make_model(config)
    assert isinstance(gpt.bigram, NgramEmbedding)
    in_place = make_model(config)
    pairs = in_place.grads_in_place()
    x, y = tokens(64, doc_starts=(0, 20), seed=3), tokens(64, seed=4)
    gpt(x, y).backward()
    in_place(x, y).backward()
    (table, buffer), = [(t, b) for t, b in pairs if t is in_place.bigram.table]
    torch.testing.assert_close(buffer, gpt.bigram.table.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="ngram_table needs an even bigram_rows"):
        make_model(dict(config, bigram_rows=511))
    with pytest.raises(ConfigError, match="ngram_bf16 is the n-gram table's"):
        make_model(dict(tiny_model_config, ngram_bf16=True))


def test_a_bf16_table_trains_in_bf16(tiny_model_config):
    """ngram_bf16: the table and its gradient in bf16 (the record's), the model's output as
    the float32 table's to bf16's accuracy."""
    config = dict(tiny_model_config, ngram_table=True)
    wide, narrow = make_model(config), make_model(dict(config, ngram_bf16=True))
    with torch.no_grad():
        narrow.bigram.table.copy_(wide.bigram.table)
    assert narrow.bigram.table.dtype == torch.bfloat16
    x, y = tokens(64, doc_starts=(0, 20), seed=3), tokens(64, seed=4)
    loss_wide, loss_narrow = wide(x, y), narrow(x, y)
    assert loss_narrow.item() == pytest.approx(loss_wide.item(), rel=1e-3)
    loss_narrow.backward()
    assert narrow.bigram.table.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_row_gradients_sum_to_autograds(tiny_model_config, backend):
    """Two micro-batches with the table's gradient kept as rows (``row_gradients``): summed
    per row they are autograd's dense gradient of the table, and the other parameters' are
    unchanged; compiled, the second micro-batch (another first slot) compiles nothing new."""
    dense = make_model(dict(tiny_model_config, ngram_table=True))
    rows = copy.deepcopy(dense)
    held = rows.bigram.row_gradients(2 * 2 * 64)
    forward = rows if backend is None else torch.compile(rows, backend=backend,
                                                         fullgraph=True, dynamic=False)
    for seed in (0, 1):
        x, y = tokens(64, seed=seed), tokens(64, seed=seed + 5)
        dense(x, y).backward()
        held.append(x)
        with torch._dynamo.config.patch(error_on_recompile=seed > 0):
            forward(x, y).backward()
    assert rows.bigram.table.grad is None and held.used == 2 * 2 * 64
    summed = torch.zeros_like(rows.bigram.table).index_add_(0, held.ids[:held.used],
                                                            held.grads[:held.used])
    torch.testing.assert_close(summed, dense.bigram.table.grad)
    for (name, p), q in zip(rows.named_parameters(), dense.parameters(), strict=True):
        if p is not rows.bigram.table and q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
