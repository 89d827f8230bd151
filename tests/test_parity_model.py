"""Record #89's model against the record's own code (tests/reference/record89/, README there).

The record's tiny model (its 11-layer topology at width 48: vocabulary 384, 6 heads of 8,
16-token blocks, DC window 14, bigram table of 128 rows) was run on the CPU in float32 with the
record's initial weights, perturbed so that every zero-initialised path carries signal. The
same weights, loaded into config/record89.py's model at those sizes by the mapping below (the
record keeps banks of layers and the lm_head transposed), must give the same loss, each of
its terms (next token, the two tokens after it, the prefix token), the same final hidden
states, the same
validation losses (at the stage's windows, and at the final validation's longer windows after
three YaRN growths), and the same gradient of every parameter.

Tolerances: float32 on both sides, different summation orders: 1e-5 relative on losses and
hidden states; on gradients 1e-4 relative plus 1e-5 of the tensor's largest entry (entries
near zero are sums that cancel) and 1e-7 (the few scalars whose gradient itself cancels:
layer 7's lambdas, 6e-5, agree to 5e-4 of it).
The gradients are exact autograd's: the record's fused loss kernel normalises the last K - 1
rows of a micro-batch with the weights of MTP terms that do not exist there (README, Recipe),
which this project does not copy.
"""

import hashlib
import json

import numpy as np
import pytest
import torch

import run
from layers.bigram import bigram_hash
from model import build_model, model_config
from utils import REPO_ROOT

REFERENCE = REPO_ROOT / "tests" / "reference" / "record89"


@pytest.fixture(scope="module")
def reference():
    inputs = torch.load(REFERENCE / "model_inputs.pt", weights_only=True)
    outputs = torch.load(REFERENCE / "model_outputs.pt", weights_only=True)
    return inputs, outputs


def tiny_config(reference_config):
    """config/record89.py's model at the reference's sizes: the layers' roles are the shipped
    config's own."""
    c = reference_config
    base = run.load_config(REPO_ROOT / "config" / "record89.py")["model_config"]
    return dict(base, vocab_size=c["vocab_size"], model_dim=c["model_dim"],
                num_heads=c["num_heads"], head_dim=c["head_dim"], ffn_dim=c["mlp_hdim"],
                block_size=c["block_size"], dc_window=c["dc_window"],
                bigram_rows=c["bigram_vocab_size"], bigram_sign_rows=c["bigram_sign_table_rows"],
                gate_hidden=c["mudd_gate_dim"], mudd_hidden=c["mudd_dim"],
                prefix_prediction=False, fp8_lm_head=False, fp8_mlp=False,
                fused_mlp=False)


def from_record(gpt, R, vocab):
    """{our parameter: its tensor in the record's layout}, for the record's tensors ``R``
    (weights or gradients, by the record's names)."""
    m = {gpt.embed: R["embed"], gpt.lm_head: R["lm_head"].T}
    for j, table in enumerate(gpt.value_embeds.tables):
        m[table] = R["value_embeds"][j * vocab:(j + 1) * vocab]
    value_gate_row = {1: 0, 2: 1, 8: 2, 9: 3}  # the record's bank row 4 is unused
    for i, block in enumerate(gpt.blocks):
        if block.attn is not None:
            a = i - (i > 6)  # the record's banks skip the layer without attention
            m[block.attn.qk] = R["qk_bank"][6 * a:6 * a + 6].flatten(0, 1)
            m[block.attn.vo] = R["vo_bank"][2 * a:2 * a + 2]
            m[block.attn.lambdas] = R["scalars"][2 * i:2 * i + 2]
            if block.attn.value_gate is not None:
                m[block.attn.value_gate] = R["ve_gate_bank"][value_gate_row[i]]
        m[block.mlp.fc] = R["mlp_bank"][i, 0]
        m[block.mlp.proj] = R["mlp_bank"][i, 1].T
    m.update(residual_scalars(gpt, R))
    for j, net in enumerate((gpt.last_mix, gpt.final_mix)):
        n = net.bias.numel()
        m[net.w1], m[net.w2], m[net.bias] = (R["mudd_w1"][j], R["mudd_w2"][j, :n],
                                             R["mudd_b2"][j, :n])
    m[gpt.gates.scale] = R["_mudd_gate_scale"]
    for j, net in enumerate(gpt.gates.nets):
        n = net.bias.numel()
        m[net.w1], m[net.w2], m[net.bias] = (R["mudd_gate_w1"][j], R["mudd_gate_w2"][j, :n],
                                             R["mudd_gate_b2"][j, :n])
    m[gpt.bigram.table] = R["bigram_embed"]
    return m


def residual_scalars(gpt, R):
    """The residual scales, the smear gate and the skip's strength, as records #89 and #92
    both keep them."""
    m = {}
    for i, block in enumerate(gpt.blocks):
        if hasattr(block, "residual"):
            m[block.residual] = R["resid_lambdas"][i]
            m[block.post] = R["post_lambdas"][i]
    m[gpt.smear.strength] = R["scalars"][22:23]
    m[gpt.smear.gate] = R["smear_gate"][0]
    m[gpt.skip_lambda] = R["scalars"][23]
    return m


@pytest.fixture(scope="module")
def model(reference):
    inputs, _ = reference
    gpt = build_model(model_config(tiny_config(inputs["config"])))
    mapping = from_record(gpt, inputs["params"], inputs["config"]["padded_vocab"])
    assert len(mapping) == len(list(gpt.parameters()))  # every parameter, from the record
    with torch.no_grad():
        for param, value in mapping.items():
            param.copy_(value)
        gpt.bigram.signs.copy_(inputs["buffers"]["bigram_sign_table"])
    gpt.prefix_table = inputs["buffers"]["prefix_table"]  # the record's, for its tiny vocab
    return gpt


def batch(inputs):
    """Token ids, next tokens, document ids and the schedule's values at the record's step."""
    ids = inputs["inputs"]
    return ids["input_ids"], ids["target_ids"], ids["doc_ids"].int(), inputs["schedule"]


def loss_weights(schedule, mtp=None, prefix=None):
    mtp = schedule["mtp_weights"] if mtp is None else torch.tensor(mtp)
    prefix = schedule["prefix_weight"] if prefix is None else torch.tensor([prefix])
    return torch.cat([mtp, prefix]).float()


def windows_in_blocks(tokens, block):
    return tuple(int(w) // block for w in tokens)


def test_training_loss_terms_and_hidden_states(reference, model):
    inputs, outputs = reference
    x, y, docs, s = batch(inputs)
    T = x.numel()
    block = inputs["config"]["block_size"]
    model.yarn.set_windows(windows_in_blocks(s["train_windows_tokens"], block))
    with torch.no_grad():
        total = model(x, y, docs, loss_weights(s)) * T  # the record sums over tokens
        terms = [model(x, y, docs, loss_weights(s, mtp=w, prefix=0.0)) * T
                 for w in ([s["mtp_weights"][0], 0, 0], [0, s["mtp_weights"][1], 0],
                           [0, 0, s["mtp_weights"][2]])]
        terms.append(model(x, y, docs, loss_weights(s, mtp=[0.0, 0, 0])) * T)
        hidden = model.hidden_states(x, docs)
    loss = outputs["loss"]
    assert total.item() == pytest.approx(loss["train_total"].item(), rel=1e-5)
    for got, key in zip(terms, ("train_ce_k0_sum_weighted", "train_ce_k1_sum_weighted",
                                "train_ce_k2_sum_weighted", "train_prefix_sum_weighted"),
                        strict=True):
        assert got.item() == pytest.approx(loss[key].item(), rel=1e-5), key
    torch.testing.assert_close(hidden, outputs["pieces"]["final_norm"], rtol=1e-5, atol=1e-5)


def test_every_gradient(reference, model):
    inputs, outputs = reference
    x, y, docs, s = batch(inputs)
    model.zero_grad()
    model.yarn.set_windows(windows_in_blocks(s["train_windows_tokens"],
                                             inputs["config"]["block_size"]))
    (model(x, y, docs, loss_weights(s)) * x.numel()).backward()
    expected = from_record(model, outputs["grads"], inputs["config"]["padded_vocab"])
    names = {param: name for name, param in model.named_parameters()}
    for param, want in expected.items():
        got = param.grad if param.grad is not None else torch.zeros_like(param)
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale + 1e-7,
                                   msg=names[param])


def test_validation_losses(reference, model):
    """Next-token loss only, at the stage's windows; then at the final validation's windows
    (6 and 20 blocks) after the YaRN of the growths to 7, 11 and 13 blocks, none for 20."""
    inputs, outputs = reference
    x, y, docs, s = batch(inputs)
    block = inputs["config"]["block_size"]
    next_token = loss_weights(s, mtp=[1.0, 0, 0], prefix=0.0)
    model.yarn.set_windows(windows_in_blocks(s["train_windows_tokens"], block))
    with torch.no_grad():
        assert model(x, y, docs, next_token).item() == pytest.approx(
            outputs["loss"]["val_mean"].item(), rel=1e-5)
        for windows in ((3, 7), (5, 11), (6, 13)):
            model.yarn.set_windows(windows)
        model.yarn.set_windows(windows_in_blocks(s["final_windows_tokens"], block), yarn=False)
        assert model.yarn.attn_scale.item() == pytest.approx(s["final_attn_scale"].item(),
                                                             rel=1e-6)
        assert model(x, y, docs, next_token).item() == pytest.approx(
            outputs["loss"]["val_final_mean"].item(), rel=1e-5)


def test_bigram_hash_and_prefix_table():
    data = json.loads((REFERENCE / "bigram_prefix.json").read_text())
    rows = bigram_hash(torch.tensor(data["tokens"]), data["table_rows"])
    assert rows.tolist() == data["rows"]
    pytest.importorskip("tiktoken")
    from data.prefix_table import build_prefix_table

    table = build_prefix_table(50304)
    digest = hashlib.sha256(table.astype(np.int32).astype("<i4").tobytes()).hexdigest()
    assert digest == data["prefix_table_sha256_int32_le"]
    assert {str(k): int(table[int(k)]) for k in data["prefix_examples"]} == \
        data["prefix_examples"]
