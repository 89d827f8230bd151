"""model.py (record #89's GPT): causality, document isolation, the reach validation relies on,
the gate layout, one compiled graph, labels, dtypes, FLOPs. Its parity with the record's own
code is tests/test_parity_model.py."""

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import make_gpt, make_model, tokens

import kernels
import model as M
import optimizers
import run
from data.loader import validation_pieces
from data.shards import BOS_ID, write_shard
from layers.mlp import ACTIVATIONS
from utils import ConfigError

BOS = BOS_ID


@pytest.mark.parametrize("name", ["tiny_model_config", "tiny_record92_config"])
def test_causality(name, request):
    gpt = make_model(request.getfixturevalue(name))
    x = tokens(96, doc_starts=(0, 40))
    logits = gpt(x)
    for t in (10, 41, 70):
        changed = x.clone()
        changed[t + 1:] = tokens(96 - t - 1, seed=t)
        torch.testing.assert_close(gpt(changed)[:t + 1], logits[:t + 1], atol=1e-5, rtol=0)
        assert not torch.allclose(gpt(changed)[t + 1:], logits[t + 1:])


@pytest.mark.parametrize("untied,ngram,record92", [(False, False, False), (True, False, False),
                                                   (False, True, False), (False, True, True)])
def test_decoding_equals_the_full_forward_pass(tiny_model_config, tiny_record92_config, untied,
                                               ngram, record92):
    # Past token 204 (the receptive field at windows of 1 and 2 blocks) the state drops tokens
    # no new one depends on; documents start at 37 and 250, where the smear gate, the bigram
    # hash and attention must stop (the n-gram table's hashes read across a start, as the
    # record's: the full pass does too). Record #92's model: its own layers and widths.
    config = tiny_record92_config if record92 else dict(tiny_model_config, ngram_table=ngram)
    gpt = make_model(config, 1, 2)
    if untied:
        gpt.tie.tied = False
        with torch.no_grad():
            gpt.embed.add_(torch.randn_like(gpt.embed) * 0.05)
    x = tokens(320, doc_starts=(0, 37, 250))
    with torch.no_grad():
        full = gpt(x)
    state = gpt.start_decoding()
    pieces = [gpt.decode(x[:10], state)]  # a prompt, then token by token, then a few at once
    pieces += [gpt.decode(x[t:t + 1], state) for t in range(10, 300)]
    pieces.append(gpt.decode(x[300:], state))
    torch.testing.assert_close(torch.cat(pieces), full[:, :gpt.config.vocab_size], atol=2e-5,
                               rtol=1e-5)
    # reach, two blocks, the last 20
    assert state.tokens.numel() <= gpt.config.receptive_field((1, 2)) + 2 * 16 - 1 + 20


def test_a_decoding_step_reads_only_the_receptive_field(tiny_model_config, monkeypatch):
    gpt = make_model(tiny_model_config, 1, 2)
    reach = gpt.config.receptive_field((1, 2))
    lengths = []
    hidden_states = gpt.hidden_states

    def counting(inputs, docs):
        lengths.append(inputs.numel())
        return hidden_states(inputs, docs)

    state = gpt.start_decoding()
    gpt.decode(tokens(40), state)
    monkeypatch.setattr(gpt, "hidden_states", counting)
    for t in range(400):
        gpt.decode(tokens(1, seed=t), state)
    # the reach and the new token, in whole blocks of 16, whatever the length
    assert max(lengths) == -(-(reach + 1 + 15) // 16) * 16


def test_document_isolation(tiny_model_config):
    """A document's outputs depend on no other document but through its start: the bigram
    hash and the smear gate read the token before it, and (as in the record) the key offset
    gives its first token the previous token's key, which has seen that document. Without the
    key offset, a rewrite of the previous document but its last token changes nothing."""
    gpt = make_model(dict(tiny_model_config, key_offset=False))
    x = tokens(96, doc_starts=(0, 40))
    changed = x.clone()
    changed[1:39] = tokens(38, seed=7)  # rewrite document one but its last token
    torch.testing.assert_close(gpt(changed)[40:], gpt(x)[40:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("ngram,record92", [(False, False), (True, False), (True, True)])
def test_reach_bounds_what_a_token_sees(tiny_model_config, tiny_record92_config, ngram,
                                        record92):
    """Validation scores a chunk in pieces behind ``receptive_field`` tokens of context: a token
    further back than that must not change an output, one at the edge of a window must."""
    gpt = make_model(tiny_record92_config if record92
                     else dict(tiny_model_config, ngram_table=ngram))
    windows = (1, 2)
    reach = gpt.config.receptive_field(windows)
    T = -(-(reach + 64) // 16) * 16
    x = tokens(T)
    changed = x.clone()
    changed[5] = (x[5] + 1) % 50000
    diff = (gpt(changed) - gpt(x)).abs().amax(-1)
    assert diff[:5].max() == 0 and diff[5:40].min() > 0
    assert diff[5 + reach + 1:].max() == 0


def test_validation_pieces_score_as_one_pass(tiny_model_config, tmp_path):
    """A chunk scored in pieces behind their context gives the losses of one pass over it."""
    gpt = make_model(tiny_model_config)
    stream = tokens(2000, doc_starts=(0, 300, 301, 900, 1500)).numpy()
    write_shard(tmp_path / "v_val_000000.bin", stream)
    context = -(-gpt.config.receptive_field((1, 2)) // 16) * 16
    pieces, scored = validation_pieces(str(tmp_path / "v_val_*.bin"), 1024, 512, 256,
                                       context)
    assert scored == 1024 and len(pieces) == 2 * (1 + 256 // (256 - context) + 1)
    weights = torch.tensor([1.0, 0.0, 0.0, 0.0])
    with torch.no_grad():
        total = sum(gpt(x, y, None, weights) * x.numel() for x, y in pieces)
        whole = [gpt(torch.from_numpy(stream[s:s + 512]).long(),
                     torch.from_numpy(stream[s + 1:s + 513]).long(), None, weights) * 512
                 for s in (0, 512)]
    assert total.item() == pytest.approx(sum(whole).item(), rel=1e-5)


def test_gate_layout_is_the_records(tiny_model_config):
    """The channels of the two gate networks, in the record's order (its mudd_gate_b2 rows):
    pre 26 (XSA of layers 1 and 3, the gate of 3, x0 and bigram gates of 0-3), post 41 (XSA of
    4 and 7, the gate of 10, x0 and bigram gates of 4, 5, 7, 8, 9, the skip, DC's mixes)."""
    layout = make_gpt(tiny_model_config).layout
    H = 2
    assert layout.sizes == (3 * H + 8, 5 * H + 11)
    assert layout.slots["xsa", 1] == (0, 0, H) and layout.slots["xsa", 3] == (0, H, H)
    assert layout.slots["attn_gate", 3] == (0, 2 * H, H)
    assert layout.slots["x0", 0] == (0, 3 * H, 1) and layout.slots["bigram", 3] == (0, 3 * H + 7, 1)
    assert layout.slots["skip", 6] == (1, 3 * H + 10, 1)
    assert layout.slots["dc_w2", 10] == (1, 3 * H + 11 + H, H)
    full = make_gpt(run.load_config(Path(M.__file__).parent / "config" / "record89.py")
                    ["model_config"] | {"prefix_prediction": False}).layout
    assert full.sizes == (26, 41)


def test_one_compiled_graph_across_the_untie_windows_and_loss_weights(tiny_model_config):
    gpt = make_model(tiny_model_config)
    compiled = torch.compile(gpt, backend="eager", fullgraph=True, dynamic=False)
    x, y = tokens(64), tokens(64, seed=3)
    weights = torch.tensor([1.0, 0.5, 0.25, 0.25])
    compiled(x, y, None, weights).backward()
    gpt.tie.untie(optimizers.build_optimizer(gpt, optimizers.OptimizerConfig.from_dict(
        run.load_config(Path(M.__file__).parent / "config" / "cpu.py")["optimizer_config"])))
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x, y, None, weights).backward()
        gpt.yarn.set_windows((2, 4))
        weights.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        compiled(x, y, None, weights).backward()


def test_a_target_left_out_is_a_target_weighed_zero(tiny_model_config):
    """The loss without the prefix token's target (prefix=False; its weight then unused) and
    with fewer tokens ahead is the loss, and gives the gradients, of those targets at weight 0:
    what lets a stage's loss compute only the targets it weighs."""
    gpt = make_model(dict(tiny_model_config, prefix_prediction=True))
    x, y = tokens(64, doc_starts=(0, 30)), tokens(64, seed=3)

    def loss_and_grads(weights, prefix):
        gpt.zero_grad()
        loss = gpt(x, y, None, torch.tensor(weights), prefix=prefix)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in gpt.parameters() if p.grad is not None]

    def close(a, b):
        return all(torch.allclose(u, v, rtol=1e-6, atol=1e-9) for u, v in zip(a, b, strict=True))

    narrow = loss_and_grads([1.0, 0.7], prefix=False)
    assert close(narrow, loss_and_grads([1.0, 0.0, 0.0], prefix=True))
    assert not close(narrow, loss_and_grads([1.0, 0.0, 0.7], prefix=True))
    ahead = loss_and_grads([1.0, 0.5, 0.7], prefix=False)
    assert close(ahead, loss_and_grads([1.0, 0.5, 0.0, 0.0], prefix=True))
    assert not close(ahead, narrow)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_table_grads_in_place_equal_autograds(tiny_model_config, backend):
    """Two micro-batches: the buffers' rows, collected, are the gradients autograd gives the
    tables, and nothing else changes; under torch.compile the backward's in-place adds run
    too (AOTAutograd traces them)."""
    plain = make_model(tiny_model_config)
    in_place = make_model(tiny_model_config)
    pairs = in_place.grads_in_place()
    assert [t for t, _ in pairs] == [in_place.embed, *in_place.value_embeds.tables,
                                     in_place.bigram.table]
    run_ = (torch.compile(in_place, backend=backend, fullgraph=True, dynamic=False) if backend
            else in_place)
    for seed in (3, 5):
        x, y = tokens(64, doc_starts=(0, 20), seed=seed), tokens(64, seed=seed + 1)
        plain(x, y).backward()
        run_(x, y).backward()
    assert all(table.grad is None for table, _ in pairs)  # autograd gave the tables nothing
    assert all(buffer.abs().sum() > 0 for _, buffer in pairs)
    from layers.embeddings import collect_table_grads

    collect_table_grads(pairs)
    assert all(not buffer.any() for _, buffer in pairs)  # zeroed for the next step
    in_place.tie.fold_grad()
    plain.tie.fold_grad()
    for (name, p), q in zip(plain.named_parameters(), in_place.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_every_parameter_has_a_known_group(tiny_model_config):
    gpt = make_gpt(tiny_model_config)
    for name, p in gpt.named_parameters():
        assert p.label in optimizers.LABEL_GROUPS, name
        assert isinstance(p.lr_mul, float) and isinstance(p.wd_mul, float)
        if p.label in ("attn", "mlp"):
            assert p.ndim >= 2, name


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activations(tiny_model_config, activation):
    # each activation against its formula, written out with math's erf and exp, through the
    # MLP that uses it: up projection, activation, down projection
    def gelu(v):
        return 0.5 * v * (1 + math.erf(v / math.sqrt(2)))

    def silu(v):
        return v / (1 + math.exp(-v))

    single = {"relu2": lambda v: max(v, 0.0) ** 2, "gelu": gelu, "silu": silu}
    gated = {"swiglu": silu, "geglu": gelu}
    mlp = make_model(dict(tiny_model_config, activation=activation)).blocks[0].mlp
    x = torch.randn(1, 5, tiny_model_config["model_dim"],
                    generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pre = (x @ mlp.fc.T)[0].tolist()
        if activation in single:
            hidden = [[single[activation](v) for v in row] for row in pre]
        else:  # interleaved pairs: act(even) * odd
            hidden = [[gated[activation](a) * b for a, b in zip(row[0::2], row[1::2], strict=True)]
                      for row in pre]
        expected = torch.tensor(hidden) @ mlp.proj.T
        torch.testing.assert_close(mlp(x)[0], expected, atol=1e-5, rtol=1e-4)


def test_tanh_softcap(tiny_model_config):
    gpt = make_gpt(dict(tiny_model_config, softcap_form="tanh", logit_softcap=15.0))
    z = torch.tensor([-1000.0, 0.0, 1000.0])
    torch.testing.assert_close(kernels.softcap(z, *gpt.softcap_args),
                               torch.tensor([-15.0, 0.0, 15.0]))


def test_bad_config_is_named(tiny_model_config):
    with pytest.raises(ConfigError, match="window_pattern"):
        make_gpt(dict(tiny_model_config, window_pattern="SLX"))
    with pytest.raises(ConfigError, match="unknown keys \\['nope'\\]"):
        make_gpt(dict(tiny_model_config, nope=1))
    with pytest.raises(ConfigError, match="distinct attention layers"):
        make_gpt(dict(tiny_model_config, xsa_layers=(6,)))
    with pytest.raises(ConfigError, match="unpaired heads"):
        make_gpt(dict(tiny_model_config, xsa_layers=(0,)))
    with pytest.raises(ConfigError, match="dc_window"):
        make_gpt(dict(tiny_model_config, dc_window=17))
    with pytest.raises(ConfigError, match="fused_mlp is relu\\^2's MLP: activation must be relu2"):
        make_gpt(dict(tiny_model_config, fused_mlp=True, activation="gelu"))
    for key, value, message in (
            ("removed_layers", (5,), "marked - in window_pattern"),
            ("x0_layers", (6,), "x0_layers \\(6,\\) must name distinct layers before the last"),
            ("bigram_layers", (10,), "bigram_layers"),
            ("parallel_mlp_layers", (11,), "parallel_mlp_layers"),
            ("short_qk_dim", 7, "short_qk_dim 7 must be even"),
            ("half_vo_layers", (0,), "half_vo_layers cannot be DC, paired or the last layer"),
            ("final_mix_groups", 5, "final_mix_groups 5 must divide model_dim")):
        with pytest.raises(ConfigError, match=message):
            make_gpt(dict(tiny_model_config, **{key: value}))


def test_fused_mlp_keeps_its_activation_scale_in_the_state(tiny_model_config):
    """With fused_mlp (and fp8_mlp) each MLP holds the float8 scale of its hidden activation,
    starting at 1, in its state (checkpoints carry it); without either, no such state. On the
    CPU the MLP is the plain one, and the scale stays."""
    fused = make_gpt(dict(tiny_model_config, fp8_mlp=True, fused_mlp=True))
    names = [n for n in fused.state_dict() if n.endswith("mlp.act_scale")]
    assert len(names) == len(fused.blocks)
    for config in (dict(fp8_mlp=True), dict(fused_mlp=True)):
        plain = make_gpt(dict(tiny_model_config, **config))
        assert not [n for n in plain.state_dict() if "act_scale" in n]
    x = torch.randint(0, 50000, (64,))
    fused(x, torch.roll(x, -1)).backward()
    assert all(fused.state_dict()[n].item() == 1.0 for n in names)


def test_fp8_attn_takes_the_attention_projections_to_float8(tiny_model_config, monkeypatch):
    """With fp8_attn, where float8 is allowed (forced here: torch._scaled_mm runs on the CPU),
    every attention layer's QKV and output projections go through kernels.float8_linear, and
    the loss and the attention matrices' gradients follow the plain path's to float8's
    accuracy; without it, none does."""
    import kernels

    monkeypatch.setattr(kernels, "use_fp8", lambda hidden, weight, fp8: fp8)
    shapes = []
    float8_linear = kernels.float8_linear
    monkeypatch.setattr(kernels, "float8_linear",
                        lambda x, w: shapes.append(tuple(w.shape)) or float8_linear(x, w))
    config = dict(tiny_model_config, model_dim=64, head_dim=16, num_heads=4, gate_hidden=16,
                  mudd_hidden=16)
    x, y = tokens(128, doc_starts=(0, 50)), tokens(128, seed=2)
    plain, fp8 = make_model(config), make_model(dict(config, fp8_attn=True))
    loss_plain, loss_fp8 = plain(x, y), fp8(x, y)
    assert shapes == [(192, 64), (64, 64)] * sum(b.attn is not None for b in fp8.blocks)
    assert loss_fp8.item() == pytest.approx(loss_plain.item(), rel=2e-2)
    assert loss_fp8.item() != loss_plain.item()
    loss_plain.backward()
    loss_fp8.backward()
    for (name, p), q in zip(plain.named_parameters(), fp8.parameters(), strict=True):
        if name.endswith(("attn.qk", "attn.vo")):
            error = ((q.grad - p.grad).norm() / p.grad.norm()).item()
            assert error < 0.15, (name, error)
    shapes.clear()
    plain(x, y)
    assert shapes == []


@pytest.mark.parametrize("model_config", ["tiny_model_config", "record55_model_config"])
def test_sgd_reduces_loss(model_config, request):
    gpt = make_model(request.getfixturevalue(model_config), randomize=False)
    x = tokens(64, doc_starts=(0, 32))
    y = torch.roll(x, -1)
    opt = torch.optim.SGD(gpt.parameters(), lr=0.5)
    losses = []
    for _ in range(10):
        loss = gpt(x, y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.5


def test_flops_per_token_counts_keys(tiny_model_config):
    gpt = make_gpt(tiny_model_config)
    matmul = sum(p.numel() for p in gpt.parameters() if p.label in ("attn", "mlp"))
    matmul += gpt.lm_head.numel()
    # 8 short-window layers (17 keys) and 2 long (33 keys), 32 = heads x head_dim
    attention = 4 * 32 * (8 * 17 + 2 * 33)
    assert gpt.flops_per_token(64, (1, 2)) == pytest.approx(6 * matmul + 3 * attention)


def test_flops_of_record92s_model_count_what_its_layers_read(tiny_record92_config):
    """Its 7 attention layers: Q/K of 8 on the five short-window ones (V/O of 8 on 1 and 8),
    the full 16 on the two long ones; MLPs on 10 layers plus layer 8's second."""
    gpt = make_gpt(tiny_record92_config)
    D, H, ffn = 32, 2, 64
    widths = {0: (8, 16), 1: (8, 8), 2: (8, 16), 3: (16, 16), 5: (8, 16), 8: (8, 8),
              10: (16, 16)}
    matmul = sum(2 * H * qk * D + 2 * H * v * D for qk, v in widths.values())
    matmul += 11 * 2 * ffn * D + gpt.lm_head.numel()
    attention = sum(2 * H * (qk + v) * (33 if layer in (3, 10) else 17)
                    for layer, (qk, v) in widths.items())
    assert gpt.flops_per_token(64, (1, 2)) == pytest.approx(6 * matmul + 3 * attention)


@pytest.mark.parametrize("name", ["tiny_model_config", "tiny_record92_config"])
def test_no_graph_breaks(name, request):
    gpt = make_model(request.getfixturevalue(name))
    x, y = tokens(64), tokens(64, seed=2)
    explanation = torch._dynamo.explain(gpt)(x, y, None, torch.tensor([1.0, 0.5, 0.2, 0.1]))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("name", ["base", "record89"])
def test_parameter_count_matches_readme(name):
    config = run.load_config(Path(M.__file__).parent / "config" / f"{name}.py")["model_config"]
    with torch.device("meta"):
        gpt = make_gpt(dict(config, prefix_prediction=False))
    total = sum(p.numel() for p in gpt.parameters())
    readme = (Path(M.__file__).parent / "README.md").read_text()
    found = re.search(rf"`config/{name}.py` \| [^|]* \| ([\d,]+) \|", readme)
    assert found and int(found.group(1).replace(",", "")) == total


def test_bf16_compute_keeps_activations_bf16_and_tracks_float32(tiny_model_config, monkeypatch):
    """The CUDA dtype plan, run on the CPU: with bf16 compute the hidden states reaching the
    lm_head op are bf16, the parameters and their gradients stay float32, and the loss and
    gradients stay close to the float32 model's."""
    gpt = make_model(tiny_model_config)
    x = tokens(128, doc_starts=(0, 50))
    y = torch.roll(x, -1)
    loss32 = gpt(x, y)
    grads32 = torch.autograd.grad(loss32, list(gpt.parameters()))
    monkeypatch.setattr(M.GPT, "compute_dtype", staticmethod(lambda inputs: torch.bfloat16))
    seen = []
    op = kernels.linear_softcap_cross_entropy

    def recording_op(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return op(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(kernels, "linear_softcap_cross_entropy", recording_op)
    loss16 = gpt(x, y)
    grads16 = torch.autograd.grad(loss16, list(gpt.parameters()))
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-2)
    for (name, p), g16, g32 in zip(gpt.named_parameters(), grads16, grads32, strict=True):
        assert p.dtype == g16.dtype == torch.float32, name
        error = (g16 - g32).norm() / g32.norm().clamp_min(1e-12)
        assert error < 0.15, (name, error.item())


def test_attention_reads_the_stream_before_its_residual_scale(tiny_record92_config):
    """A layer's attention input is its input stream, normed, whatever the layer's residual
    scale r_a does to the stream afterwards (a negative r_a included)."""
    gpt = make_model(tiny_record92_config)
    seen = []
    gpt.blocks[1].attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = tokens(64)
    with torch.no_grad():
        for scale in (1.0, -1.0):
            gpt.blocks[1].residual[0] = scale
            gpt.hidden_states(x, M.document_ids(x))
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)
