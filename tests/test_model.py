"""model.py: masks, causality, document isolation, windows, YaRN, untie, gates, labels."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import model as M
import optimizers
import run

BOS = M.BOS_ID


def make_model(config, short=1, long=2, seed=0, randomize=True):
    """A tiny model whose zero-initialised parts are randomised, so every path carries signal."""
    torch.manual_seed(seed)
    gpt = M.GPT(config)
    gpt.set_windows(short, long)
    if randomize:
        with torch.no_grad():
            for p in gpt.parameters():
                if p is not gpt.embed:  # a tied model's embedding is its lm_head
                    p.add_(torch.randn_like(p) * (0.3 if p.ndim < 2 else 0.05))
        gpt.sync_tied_weights()
    return gpt


def tokens(n, doc_starts=(0,), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50000, (n,), generator=g)
    x[list(doc_starts)] = BOS
    return x


def brute_force_mask(docs, window, block):
    T = len(docs)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(q + 1):
            mask[q, k] = docs[q] == docs[k] and q // block - k // block < window
    return mask


def test_dense_mask_is_the_rule():
    x = tokens(64, doc_starts=(0, 5, 30, 31, 47))
    docs = M.document_ids(x)
    for window in (1, 2, 3, 10):
        assert torch.equal(M.dense_attention_mask(docs, window, 8),
                           brute_force_mask(docs.tolist(), window, 8))


@pytest.mark.parametrize("window", [1, 2, 5])
def test_block_mask_matches_dense_mask(window):
    x = tokens(128, doc_starts=(0, 5, 30, 31, 47, 64, 100))
    docs = M.document_ids(x)
    (block_mask,) = M.block_attention_masks(docs, [window], 16)
    assert torch.equal(block_mask.to_dense().bool()[0, 0].repeat_interleave(16, 0)
                       .repeat_interleave(16, 1) & brute_force_mask(docs.tolist(), window, 16),
                       brute_force_mask(docs.tolist(), window, 16))
    # FlexAttention (whose forward runs on the CPU) and SDPA with the dense mask agree
    q, k, v = torch.randn(3, 1, 2, 128, 32).unbind(0)
    flex = flex_attention(q, k, v, block_mask=block_mask, scale=0.1)
    dense = F.scaled_dot_product_attention(
        q, k, v, attn_mask=M.dense_attention_mask(docs, window, 16), scale=0.1)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_block_mask_skips_blocks_outside_window_and_documents():
    x = tokens(128, doc_starts=(0, 64))  # two documents of four 16-token blocks each
    (block_mask,) = M.block_attention_masks(M.document_ids(x), [2], 16)
    kv_num = block_mask.kv_num_blocks[0, 0].tolist()
    full_num = block_mask.full_kv_num_blocks[0, 0].tolist()
    # the first block of each document has only its diagonal (partial) block
    assert [kv_num[i] + full_num[i] for i in range(8)] == [1, 2, 2, 2, 1, 2, 2, 2]
    assert full_num == [0, 1, 1, 1, 0, 1, 1, 1]


def test_causality(tiny_model_config):
    gpt = make_model(tiny_model_config, 2, 4)
    x = tokens(96, doc_starts=(0, 40))
    logits = gpt(x)
    for t in (10, 41, 70):
        changed = x.clone()
        changed[t + 1:] = tokens(96 - t - 1, seed=t)
        torch.testing.assert_close(gpt(changed)[:t + 1], logits[:t + 1], atol=1e-5, rtol=0)
        assert not torch.allclose(gpt(changed)[t + 1:], logits[t + 1:])


def test_document_isolation(tiny_model_config):
    gpt = make_model(tiny_model_config, 2, 4)
    x = tokens(96, doc_starts=(0, 40))
    changed = x.clone()
    changed[1:40] = tokens(39, seed=7)  # rewrite document one; document two starts at 40
    torch.testing.assert_close(gpt(changed)[40:], gpt(x)[40:], atol=1e-5, rtol=0)


def test_window_limit(tiny_model_config):
    # One attention layer with a 2-block window: a key 2+ blocks back has no influence.
    config = dict(tiny_model_config, num_layers=1, window_pattern="L", value_embed_layers=(),
                  skip_connections=(), backout_layer=None)
    gpt = make_model(config, 1, 2)
    x = tokens(96)
    changed = x.clone()
    changed[20] = 123  # block 1 (tokens 16..31); smear also reaches token 21, still block 1
    diff = (gpt(changed) - gpt(x)).abs().amax(-1)
    assert diff[:20].max() == 0
    assert (diff[20:48] > 0).all()  # block 1 and 2 see it
    assert diff[48:].max() == 0  # block 3 onwards is out of the window


def test_yarn_matches_formula(tiny_model_config):
    gpt = M.GPT(tiny_model_config)
    gpt.set_windows(10, 20)
    base = gpt.rotary_freqs.clone().double()
    gpt.set_windows(30, 60)
    old, new = 20 * 16, 60 * 16
    expected = []
    for f in base.tolist():
        turns = old * f / (2 * math.pi)
        ramp = min(max((turns - 1) / (32 - 1), 0.0), 1.0)
        expected.append(f * (ramp + (1 - ramp) * old / new))
    torch.testing.assert_close(gpt.rotary_freqs.double(), torch.tensor(expected).double())
    assert gpt.attn_scale.item() == pytest.approx(0.12 * (1 + 0.2 * math.log(3)))
    # the zero-frequency half and the fastest dims are untouched, the slowest are divided by 3
    assert gpt.rotary_freqs[0] == base[0]
    assert gpt.rotary_freqs[7].item() == pytest.approx(base[7].item() / 3)
    assert (gpt.rotary_freqs[8:] == 0).all()
    # extending for validation without YaRN only changes the windows
    freqs = gpt.rotary_freqs.clone()
    gpt.set_windows(40, 80, yarn=False)
    assert torch.equal(gpt.rotary_freqs, freqs) and gpt.windows.tolist() == [40, 80]


def test_first_set_windows_applies_no_yarn(tiny_model_config):
    gpt = M.GPT(tiny_model_config)
    base = gpt.rotary_freqs.clone()
    gpt.set_windows(3, 7)
    assert torch.equal(gpt.rotary_freqs, base)
    assert gpt.attn_scale.item() == pytest.approx(0.12)


def test_untie(tiny_model_config):
    gpt = make_model(tiny_model_config)
    x, y = tokens(64), tokens(64, seed=3)
    before = gpt(x)
    assert gpt.tied
    embed = gpt.untie()
    assert not gpt.tied and embed.label == "embed" and embed is gpt.embed
    torch.testing.assert_close(gpt(x), before, atol=0, rtol=0)
    gpt(x, y).backward()
    assert gpt.embed.grad is not None and gpt.lm_head.grad is not None
    with torch.no_grad():
        gpt.embed.add_(1.0)
    assert not torch.equal(gpt.embed, gpt.lm_head)
    with pytest.raises(RuntimeError, match="already untied"):
        gpt.untie()


def test_folded_gradient_is_that_of_one_shared_tensor(tiny_model_config):
    gpt = make_model(tiny_model_config)
    x, y = tokens(64), tokens(64, seed=3)
    shared = torch.func.functional_call(gpt, {"embed": gpt.lm_head}, (x, y))
    expected = torch.autograd.grad(shared, gpt.lm_head)[0]
    gpt(x, y).backward()
    assert not torch.equal(gpt.embed.grad, torch.zeros_like(gpt.embed.grad))
    gpt.fold_tied_grad()
    assert gpt.embed.grad is None
    torch.testing.assert_close(gpt.lm_head.grad, expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        gpt.lm_head.sub_(1.0)
    gpt.sync_tied_weights()
    assert torch.equal(gpt.embed, gpt.lm_head)


def test_one_compiled_graph_before_and_after_the_untie(tiny_model_config):
    gpt = make_model(tiny_model_config)
    compiled = torch.compile(gpt, backend="eager", fullgraph=True, dynamic=False)
    x, y = tokens(64), tokens(64, seed=3)
    compiled(x, y).backward()
    gpt.untie()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x, y).backward()
        gpt.set_windows(2, 4)
        compiled(x, y).backward()


def test_blocks_are_identity_at_init(tiny_model_config):
    # Zero output projections: every block adds nothing; the residual scalings, the skip and
    # the backout only rescale x0, which the final norm removes. So the logits at init are
    # those of the tied embedding alone.
    torch.manual_seed(0)
    gpt = M.GPT(tiny_model_config)
    gpt.set_windows(1, 2)
    x = tokens(64)
    e = M.norm(F.embedding(x, gpt.lm_head))  # smear lambda is 0 at init
    expected = gpt.softcap(M.norm(e) @ gpt.lm_head.T)[:, :50257]
    torch.testing.assert_close(gpt(x), expected, atol=1e-5, rtol=1e-5)


def reference_attention(attn, x, ve, mask, rotary, scale):
    """Attention written out plainly, with value gate 1 and output gate 1/2 (their init)."""
    w = attn.qkvo
    q, k, v = (F.linear(x, w[i]).view(1, x.size(1), 2, 32) for i in range(3))
    q, k = M.apply_rotary(M.norm(q), *rotary), M.apply_rotary(M.norm(k), *rotary)
    v = v + ve.view_as(v)
    y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                       attn_mask=mask, scale=scale.item())
    return (0.5 * y.transpose(1, 2)).flatten(2) @ w[3]


def test_gates_start_at_documented_values(tiny_model_config):
    torch.manual_seed(0)
    gpt = M.GPT(tiny_model_config)
    attn = gpt.blocks[0].attn
    x, ve = torch.randn(1, 32, 64), torch.randn(1, 32, 64)
    mask = M.dense_attention_mask(torch.zeros(32, dtype=torch.int32), 2, 16)
    with torch.no_grad():
        attn.qkvo[3].normal_()
        rotary = M.rotary_tables(gpt.rotary_freqs, 32)
        got = attn(x, ve, mask, rotary, gpt.attn_scale)
        expected = reference_attention(attn, x, ve, mask, rotary, gpt.attn_scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert gpt.skip_lambdas.tolist() == [-1.5] and gpt.smear_lambda.item() == 0.0


def test_every_parameter_has_a_known_group(tiny_model_config):
    gpt = M.GPT(tiny_model_config)
    gpt.untie()
    for name, p in gpt.named_parameters():
        assert p.label in optimizers.LABEL_GROUPS, name
        assert isinstance(p.lr_mul, float) and isinstance(p.wd_mul, float)
        if p.label in ("attn", "mlp"):
            assert p.ndim >= 2, name


def test_activations(tiny_model_config):
    x = tokens(32)
    for activation in M.ACTIVATIONS:
        gpt = make_model(dict(tiny_model_config, activation=activation))
        assert torch.isfinite(gpt(x)).all(), activation


def test_tanh_softcap(tiny_model_config):
    gpt = M.GPT(dict(tiny_model_config, softcap_form="tanh", logit_softcap=15.0))
    z = torch.tensor([-1000.0, 0.0, 1000.0])
    torch.testing.assert_close(gpt.softcap(z), torch.tensor([-15.0, 0.0, 15.0]))


def test_bad_config_is_named(tiny_model_config):
    with pytest.raises(ValueError, match="window_pattern"):
        M.GPT(dict(tiny_model_config, window_pattern="SLX"))
    with pytest.raises(ValueError, match="unknown keys \\['nope'\\]"):
        M.GPT(dict(tiny_model_config, nope=1))
    with pytest.raises(ValueError, match="no attention"):
        M.GPT(dict(tiny_model_config, value_embed_layers=((2,),)))


def test_sgd_reduces_loss(tiny_model_config):
    gpt = make_model(tiny_model_config, randomize=False)
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
    gpt = M.GPT(tiny_model_config)
    gpt.set_windows(1, 2)
    T = 64
    docs = torch.zeros(T, dtype=torch.int32)
    keys = {w: M.dense_attention_mask(docs, w, 16).sum().item() / T for w in (1, 2)}
    matmul = sum(p.numel() for p in gpt.parameters() if p.label in ("attn", "mlp"))
    matmul += gpt.lm_head.numel()
    attention = 4 * 64 * (keys[1] + 2 * keys[2])  # pattern S L - L
    assert gpt.flops_per_token(T) == pytest.approx(6 * matmul + 3 * attention)
    assert gpt.flops_per_token(T, (1, 2)) == gpt.flops_per_token(T)


def test_generate_is_deterministic_and_padding_free(tiny_model_config):
    gpt = make_model(tiny_model_config)
    out = gpt.generate([BOS, 10, 20], 5, temperature=0)
    assert len(out) == 8 and out[:3] == [BOS, 10, 20]
    assert out == gpt.generate([BOS, 10, 20], 5, temperature=0)
    g = torch.Generator().manual_seed(0)
    sampled = gpt.generate([BOS, 10], 4, temperature=1.0, top_k=5, generator=g)
    assert len(sampled) == 6 and all(0 <= t < 50257 for t in sampled)


def test_no_graph_breaks(tiny_model_config):
    gpt = make_model(tiny_model_config)
    x, y = tokens(64), tokens(64, seed=2)
    explanation = torch._dynamo.explain(gpt)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_base_parameter_count_matches_readme():
    config = run.load_config(Path(M.__file__).parent / "config" / "base.py")["model_config"]
    with torch.device("meta"):
        gpt = M.GPT(config)
    untied = sum(p.numel() for p in gpt.parameters())
    readme = (Path(M.__file__).parent / "README.md").read_text()
    found = re.search(r"([\d,]+) parameters", readme)
    assert found and int(found.group(1).replace(",", "")) == untied - gpt.embed.numel()
    assert f"{untied:,} for `config/base.py`" in readme


def test_bf16_compute_keeps_activations_bf16_and_tracks_float32(tiny_model_config, monkeypatch):
    """The CUDA dtype plan, run on the CPU: with bf16 compute every block's output and the
    hidden states reaching the lm_head op are bf16 (a float32 scalar parameter promoting the
    residual stream would make the lm_head matmul float32 and its (T, V) buffer twice the
    size), the parameters and their gradients stay float32, and the loss and gradients stay
    close to the float32 model's."""
    gpt = make_model(tiny_model_config)
    x = tokens(128, doc_starts=(0, 50))
    y = torch.roll(x, -1)
    loss32 = gpt(x, y)
    grads32 = torch.autograd.grad(loss32, list(gpt.parameters()))

    monkeypatch.setattr(M.GPT, "compute_dtype", staticmethod(lambda inputs: torch.bfloat16))
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
             for b in gpt.blocks]
    op = M.kernels.linear_softcap_cross_entropy

    def recording_op(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return op(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(M.kernels, "linear_softcap_cross_entropy", recording_op)
    loss16 = gpt(x, y)
    grads16 = torch.autograd.grad(loss16, list(gpt.parameters()))
    for h in hooks:
        h.remove()
    assert seen == [torch.bfloat16] * len(gpt.blocks) + [(torch.bfloat16, torch.bfloat16)]
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-2)
    for (name, p), g16, g32 in zip(gpt.named_parameters(), grads16, grads32, strict=True):
        assert p.dtype == g16.dtype == torch.float32, name
        error = (g16 - g32).norm() / g32.norm().clamp_min(1e-12)
        assert error < 0.1, (name, error.item())


def test_rotary_tables_are_cos_and_sin_of_position_times_frequency():
    """One op, also when traced (aot_eager checks its fake registration), so that inductor keeps
    the tables instead of re-evaluating sin and cos in every layer."""
    freqs = M.rotary_frequencies(16, 0.5, 1024.0).float()
    tables = torch.compile(M.rotary_tables, backend="aot_eager", fullgraph=True)(freqs, 40)
    angles = torch.arange(40.0)[:, None] * freqs[None, :]
    for got, expected in zip(tables, (angles.cos(), angles.sin()), strict=True):
        assert got.shape == (1, 40, 1, 8)
        torch.testing.assert_close(got[0, :, 0], expected)
