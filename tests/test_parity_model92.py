"""Record #92's model against the record's own code (tests/reference/record92/model.pt, README
there): config/record92.py's model at the reference's sizes (the record's widths, a small
vocabulary, MLP and n-gram table), with the reference's weights mapped in, must give the
record's training objective and its terms, final hidden states, losses after each YaRN growth
and at the final validation, and gradients.

The record keeps its layers' matrices in banks, compacted and permuted (its slot of each
attention layer below), its gate networks' channels in record #89's layout (dead channels of
removed sublayers included, which this model drops: their gradient is zero) and its final
mix's value embeddings in another order; the mapping undoes that.

Tolerances: float32 on both sides, different summation orders: 1e-5 relative on losses and
hidden states; gradients 1e-4 relative plus 1e-5 of the tensor's largest entry (2e-5 on the
norm of the sampled ones).
"""

import pytest
import torch
from test_parity_model import residual_scalars

import run
from layers.mudd import GateLayout
from model import build_model, model_config
from utils import REPO_ROOT

REF = torch.load(REPO_ROOT / "tests" / "reference" / "record92" / "model.pt", weights_only=True)
SLOT = {0: 0, 1: 3, 2: 1, 3: 5, 5: 2, 8: 4, 10: 6}  # attention layer -> the record's bank slot
FINAL_MIX_ROWS = [0, 1, 2, 3, 4, 5, 7, 6, 8, 9]  # ours: value embeddings in layer order


def record_params():
    params = {label: value.clone() for label, value in REF["small_params"].items()}
    for label, r in REF["recipe"].items():
        generator = torch.Generator().manual_seed(r["seed"])
        params[label] = torch.randn(r["shape"], generator=generator) * r["std"]
    params["embed"] = params["lm_head"].T
    return params


def tiny_config():
    c = REF["config"]
    config = run.load_config(REPO_ROOT / "config" / "record92.py")["model_config"]
    return dict(config, vocab_size=c["vocab_size"], ffn_dim=c["mlp_hdim"],
                bigram_rows=c["ngram_rows"], bigram_sign_rows=c["sign_rows"],
                ngram_bf16=False, prefix_prediction=False, fp8_lm_head=False, fp8_mlp=False,
                fp8_attn=False)


def record_gate_rows(gpt):
    """Per gate network, the record's channel of each of ours (the record's layout is record
    #89's: config/record89.py's roles at these widths)."""
    base = run.load_config(REPO_ROOT / "config" / "record89.py")["model_config"]
    theirs = GateLayout(model_config(dict(base, **{k: tiny_config()[k] for k in (
        "model_dim", "num_heads", "head_dim")})))
    rows = [[0] * size for size in gpt.layout.sizes]
    for key, (net, start, width) in gpt.layout.slots.items():
        their_net, their_start, _ = theirs.slots[key]
        assert their_net == net
        rows[net][start:start + width] = range(their_start, their_start + width)
    return [torch.tensor(r) for r in rows]


def from_record(gpt, R):
    """{our parameter: its tensor in the record's layout}, for the record's tensors ``R``."""
    vocab = REF["config"]["padded_vocab"]
    m = {gpt.embed: R["embed"], gpt.lm_head: R["lm_head"].T}
    for j, table in enumerate(gpt.value_embeds.tables):
        m[table] = R["value_embeds"][j * vocab:(j + 1) * vocab]
    value_gate_row = {1: 0, 2: 1, 8: 2}
    for i, block in enumerate(gpt.blocks):
        if block.attn is not None:
            s = SLOT[i]
            m[block.attn.qk] = R["qk_bank"][6 * s:6 * s + 6].flatten(0, 1)
            m[block.attn.vo] = R["vo_bank"][2 * s:2 * s + 2]
            m[block.attn.lambdas] = R["scalars"][2 * i:2 * i + 2]
            if block.attn.value_gate is not None:
                m[block.attn.value_gate] = R["ve_gate_bank"][value_gate_row[i]]
        for mlp, slot in ((block.mlp, i), (block.mlp2, 11)):
            if mlp is not None:
                m[mlp.fc], m[mlp.proj] = R["mlp_bank"][slot, 0], R["mlp_bank"][slot, 1].T
    m.update(residual_scalars(gpt, R))
    m[gpt.last_mix.w1], m[gpt.last_mix.w2], m[gpt.last_mix.bias] = (
        R["mudd_w1"][0], R["mudd_w2"][0], R["mudd_b2"][0])
    final, rows = gpt.final_mix, FINAL_MIX_ROWS
    m[final.w1], m[final.w2], m[final.bias], m[final.w2g] = (
        R["mudd_w1"][1], R["mudd_w2"][1, rows], R["mudd_b2"][1, rows], R["mudd_w2g"][rows])
    m[gpt.gates.scale] = R["_mudd_gate_scale"]
    for j, (net, channels) in enumerate(zip(gpt.gates.nets, record_gate_rows(gpt), strict=True)):
        m[net.w1], m[net.w2], m[net.bias] = (R["mudd_gate_w1"][j], R["mudd_gate_w2"][j, channels],
                                             R["mudd_gate_b2"][j, channels])
    m[gpt.bigram.table] = R["bigram_embed"]
    return m


def record_model():
    """config/record92.py's model at the reference's sizes with the reference's weights."""
    gpt = build_model(model_config(tiny_config()))
    mapping = from_record(gpt, record_params())
    assert len(mapping) == len(list(gpt.parameters()))  # every parameter, from the record
    with torch.no_grad():
        for param, value in mapping.items():
            param.copy_(value)
        gpt.bigram.signs.copy_(REF["sign_table"].float())
    gpt.prefix_table = REF["prefix_table"]  # the record's, for its tiny vocabulary
    return gpt


@pytest.fixture(scope="module")
def model():
    return record_model()


def weights(schedule, mtp=None, prefix=None):
    mtp = schedule["mtp_weights"] if mtp is None else torch.tensor(mtp)
    prefix = schedule["prefix_weight"] if prefix is None else prefix
    return torch.cat([mtp, torch.tensor([prefix])]).float()


def at(model, name):
    """The record's YaRN state at the reference's ``name`` step: its growths, then its windows."""
    s = REF["schedule"][name]
    model.yarn.current = None
    model.yarn.load_state_dict(build_model(model.config).yarn.state_dict())
    model.yarn.set_windows((1, 3))
    for short, long in s["yarn_events"]:
        model.yarn.set_windows((short[1], long[1]))
    model.yarn.set_windows(s["windows_blocks"], yarn=False)
    return s


def batch():
    """Token ids, next tokens, and document ids from the tiny vocabulary's BOS."""
    x = REF["inputs"]["input_ids"].long()
    docs = (x == REF["config"]["bos_id"]).cumsum(0).to(torch.int32)
    return x, REF["inputs"]["target_ids"], docs


def test_training_objective_terms_and_hidden_states(model):
    x, y, docs = batch()
    s, T, out = at(model, "train"), x.numel(), REF["outputs"]
    mtp = s["mtp_weights"].tolist()
    with torch.no_grad():
        total = model(x, y, docs, weights(s)) * T
        terms = [model(x, y, docs, weights(s, mtp=[w * (j == i) for j, w in enumerate(mtp)],
                                            prefix=0.0)) * T for i in range(len(mtp))]
        terms.append(model(x, y, docs, weights(s, mtp=[0.0] * len(mtp))) * T)
        hidden = model.hidden_states(x, docs)
    assert total.item() == pytest.approx(out["train_total"].item(), rel=1e-5)
    torch.testing.assert_close(torch.stack(terms), out["terms"], rtol=1e-5, atol=0.0)
    torch.testing.assert_close(hidden[0, ::32], out["final_hidden_rows"], rtol=1e-5, atol=1e-5)


def test_losses_after_each_yarn_growth_and_at_the_final_validation(model):
    x, y, docs = batch()
    out = REF["outputs"]
    with torch.no_grad():
        for name, key in (("stage1", "stage1_total"), ("stage2", "stage2_total")):
            s = at(model, name)
            assert (model(x, y, docs, weights(s)) * x.numel()).item() == pytest.approx(
                out[key].item(), rel=1e-5), name
        next_token = torch.tensor([1.0, 0.0])
        at(model, "train")
        assert model(x, y, docs, next_token).item() == pytest.approx(out["val_mean"].item(),
                                                                    rel=1e-5)
        at(model, "val_final")
        scales = REF["final_attn_scales"]
        assert model.yarn.attn_scale.item() == pytest.approx(scales["yarn_wide"], rel=1e-6)
        assert model.yarn.short_scale.item() == pytest.approx(scales["yarn"], rel=1e-6)
        assert model(x, y, docs, next_token).item() == pytest.approx(
            out["val_final_mean"].item(), rel=1e-5)


def large_grads(model) -> dict:
    """The model's gradients of the reference's large parameters, in the record's layout (its
    banks; zero where no layer reads), by the record's labels, on the CPU."""
    ours = {label: torch.zeros(r["shape"]) for label, r in REF["recipe"].items()}
    ours["embed"] = torch.zeros_like(ours["lm_head"].T)
    scratch = {label: value.clone() for label, value in REF["small_params"].items()}
    placed = from_record(model, {**scratch, **ours})  # the small ones' views land in copies
    with torch.no_grad():
        for param, view in placed.items():
            view.copy_(param.grad if param.grad is not None else torch.zeros_like(param))
    return ours


def test_every_gradient(model):
    """The small parameters' gradients whole; the large ones (by the reference's label, in
    the record's layout) by their norm, their entries at the stored indices and how many are
    nonzero (unread rows of the banks, their padding, the removed layer's slots: zero)."""
    x, y, docs = batch()
    s = at(model, "train")
    model.zero_grad()
    (model(x, y, docs, weights(s)) * x.numel()).backward()
    ours = large_grads(model)
    for label, got in ours.items():
        want, flat = REF["grads"][label], got.flatten()
        assert flat.norm().item() == pytest.approx(want["norm"].item(), rel=2e-5), label
        torch.testing.assert_close(flat[want["index"]], want["values"], rtol=1e-4,
                                   atol=1e-5 * want["values"].abs().max().item(), msg=label)
        # the same dead rows and columns (an entry may round to zero on one side only)
        assert int((flat != 0).sum()) == pytest.approx(want["nonzero"], abs=4), label
    small = {label: g for label, g in REF["grads"].items() if label not in ours}
    names = {param: name for name, param in model.named_parameters()}
    for param, want in from_record(model, {**small, **ours}).items():
        got = param.grad if param.grad is not None else torch.zeros_like(param)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max() + 1e-7,
                                   msg=names[param])
