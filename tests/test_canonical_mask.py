"""data/canonical_mask.py: #350's table bit for bit (tests/reference/pr350), the tokenizer
itself as the independent judge of what may be masked, the masked loss, and evaluate.py's
--canonical_mask."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F
from test_train import manager_for, tiny_config, write_tiny_shards

import evaluate
from data import canonical_mask
from data.canonical_mask import MASKED_LOGIT, build_canonical_mask, mask_logits
from data.shards import BOS_ID, read_shard

REFERENCE = Path(__file__).parent / "reference" / "pr350" / "canonical_mask.json"
VOCAB = 50304


@pytest.fixture(scope="module")
def table():
    return build_canonical_mask(VOCAB)


def masked(table, previous, token):
    return bool(table[previous, token >> 3] >> (token & 7) & 1)


def test_the_table_is_350s(table):
    reference = json.loads(REFERENCE.read_text())
    assert list(table.shape) == reference["packed_shape"] and table.dtype == np.uint8
    assert hashlib.sha256(table.tobytes()).hexdigest() == reference["sha256_packed_bits_little"]
    bits = np.unpackbits(table, axis=1, bitorder="little")
    assert int(bits.sum()) == reference["bits_set"]
    assert int(bits.any(1).sum()) == reference["rows_with_bits"]
    assert int(bits.any(0).sum()) == reference["columns_with_bits"]
    for previous, row in reference["rows"].items():
        tokens = np.nonzero(bits[int(previous)])[0]
        assert len(tokens) == row["count"] and tokens[:12].tolist() == row["first"]
    # BOS and the padding neither mask nor are masked
    assert not bits[BOS_ID:].any() and not bits[:, BOS_ID:].any()


def test_the_tokenizer_never_emits_a_masked_pair(table):
    encoding = tiktoken.get_encoding("gpt2")
    text = ("It's 1999, and they'll say we've been here: 12,345.67 apples -- naïve café, "
            "Straße, 東京 and emoji 🙂 in   spaced\ttabs\n\nNew paragraph... (quoted) \"words\" "
            "hello world HELLO World helloworld unbelievable antidisestablishmentarianism")
    ids = encoding.encode_ordinary(text)
    assert not any(masked(table, p, x) for p, x in zip(ids, ids[1:], strict=False))
    # and a masked pair, decoded alone, never encodes back to itself
    rows, tokens = np.nonzero(np.unpackbits(table[:BOS_ID], axis=1, bitorder="little"))
    rng = np.random.default_rng(0)
    for i in rng.choice(len(rows), 300, replace=False):
        pair = [int(rows[i]), int(tokens[i])]
        try:
            text = encoding.decode_bytes(pair).decode()
        except UnicodeDecodeError:
            continue  # a pair that splits a character cannot be written alone
        assert encoding.encode_ordinary(text) != pair


def test_masked_logits_leave_the_softmax_to_the_tokens_that_can_follow():
    torch.manual_seed(0)
    vocab, rows = 64, 6
    logits = 23 * torch.sigmoid(torch.randn(rows, vocab) * 3)  # softcapped, as the model's
    bits = np.random.default_rng(0).random((vocab, vocab)) < 0.3
    table = torch.from_numpy(np.packbits(bits, axis=1, bitorder="little"))
    previous = torch.tensor([0, 5, 17, 17, 63, 2])
    targets = torch.tensor([3, 9, 1, 40, 7, 11])
    got = F.cross_entropy(mask_logits(logits, previous, table), targets, reduction="none")
    for i in range(rows):  # log-sum-exp over the allowed logits, each masked one counting e^-60
        dropped = torch.from_numpy(bits[previous[i]])
        z = torch.where(dropped, MASKED_LOGIT, logits[i]).double()
        assert got[i].item() == pytest.approx((z.logsumexp(0) - z[targets[i]]).item(), rel=1e-6)
        if not dropped[targets[i]]:  # a target that can follow only gains
            assert got[i] < F.cross_entropy(logits[i], targets[i])


def test_evaluate_reports_the_masked_loss_after_each_previous_token(tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.delenv("DATA_PATH", raising=False)  # evaluate.py would read those shards
    config = tiny_config(tmp_path, write_tiny_shards(tmp_path))
    manager = manager_for(config, tmp_path)
    manager.train_step()
    path = manager.save_model(0.0)
    tokens = read_shard(tmp_path / "tiny_val_000000.bin").astype(np.int64)
    p, t = int(tokens[5]), int(tokens[6])  # scored: the first chunk of the val tokens

    def losses(previous=None, dropped=()):
        def one_row_table(vocab_size):
            bits = np.zeros((vocab_size, vocab_size), dtype=bool)
            if previous is not None:
                bits[previous, list(dropped)] = True
            return np.packbits(bits, axis=1, bitorder="little")

        monkeypatch.setattr(evaluate, "build_canonical_mask", one_row_table)
        assert evaluate.main([str(path), "--skip_hellaswag", "--device", "cpu",
                              "--canonical_mask"]) == 0
        out = capsys.readouterr().out
        plain = float(out.split("FineWeb val loss ")[1].split()[0])
        return plain, float(out.split("FineWeb val loss ")[2].split()[0])

    plain, same = losses()
    assert same == plain
    plain, target_masked = losses(p, [t])  # the token that came is masked: it costs > 20 nats
    assert target_masked > plain + 20 / 256
    # every token that never came after p masked: where p is the previous token, the loss
    # (about 10.8 at this point of training) all but vanishes
    followers = set(tokens[1:][tokens[:-1] == p].tolist())
    plain, others_masked = losses(p, [x for x in range(50304) if x not in followers])
    assert others_masked < plain - 5 / 256


def test_canonical_mask_is_refused_where_it_means_nothing(capsys):
    assert evaluate.main(["--gpt2", "--canonical_mask"]) == 2
    assert "--canonical_mask masks the val loss of a speedrun model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="multiple of 8"):
        canonical_mask.build_canonical_mask(50257)
