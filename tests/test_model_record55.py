"""model_record55.py (config/record55.py's GPT): causality, document isolation, windows, the
one graph, init, labels, dtypes."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_gpt, make_model, tokens

import kernels
import model_record55 as M
import optimizers
import run
from data.shards import BOS_ID
from layers.core import norm
from layers.masks import dense_attention_mask
from utils import ConfigError

BOS = BOS_ID


def test_causality(record55_model_config):
    gpt = make_model(record55_model_config, 2, 4)
    x = tokens(96, doc_starts=(0, 40))
    logits = gpt(x)
    for t in (10, 41, 70):
        changed = x.clone()
        changed[t + 1:] = tokens(96 - t - 1, seed=t)
        torch.testing.assert_close(gpt(changed)[:t + 1], logits[:t + 1], atol=1e-5, rtol=0)
        assert not torch.allclose(gpt(changed)[t + 1:], logits[t + 1:])


@pytest.mark.parametrize("untied", [False, True])
def test_cached_decoding_equals_the_full_forward_pass(record55_model_config, untied):
    # Windows of 1 and 2 blocks of 16: by token 70 the cache holds keys that no window reaches
    # any more; a document starts at token 37, where the smear gate and attention must stop.
    gpt = make_model(record55_model_config, 1, 2)
    if untied:
        gpt.tie.tied = False
        with torch.no_grad():
            gpt.embed.add_(torch.randn_like(gpt.embed) * 0.05)
    x = tokens(70, doc_starts=(0, 37))
    with torch.no_grad():
        full = gpt(x)
    state = gpt.start_decoding()
    pieces = [gpt.decode(x[:10], state)]  # a prompt, then token by token, then a few at once
    pieces += [gpt.decode(x[t:t + 1], state) for t in range(10, 60)]
    pieces.append(gpt.decode(x[60:], state))
    torch.testing.assert_close(torch.cat(pieces), full, atol=2e-5, rtol=1e-5)
    attention_layers = [c for c in state.caches if c is not None]
    assert [c.length for c in attention_layers] == [70] * len(attention_layers)


def test_a_decoding_step_reads_only_the_window(record55_model_config, monkeypatch):
    gpt = make_model(record55_model_config, 1, 2)  # long window: 2 blocks of 16 tokens
    attended = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, **kwargs):
        attended.append(k.size(2))
        return sdpa(q, k, v, **kwargs)

    state = gpt.start_decoding()
    gpt.decode(tokens(40), state)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    for t in range(40):
        gpt.decode(tokens(1, seed=t), state)
    # keys from the start of the window's first block: at most 2 blocks, whatever the length
    assert state.docs.numel() == 80 and max(attended) == 2 * 16


def test_document_isolation(record55_model_config):
    gpt = make_model(record55_model_config, 2, 4)
    x = tokens(96, doc_starts=(0, 40))
    changed = x.clone()
    changed[1:40] = tokens(39, seed=7)  # rewrite document one; document two starts at 40
    torch.testing.assert_close(gpt(changed)[40:], gpt(x)[40:], atol=1e-5, rtol=0)


def test_window_limit(record55_model_config):
    # One attention layer with a 2-block window: a key 2+ blocks back has no influence.
    config = dict(record55_model_config, num_layers=1, window_pattern="L", value_embed_layers=(),
                  skip_connections=(), backout_layer=None)
    gpt = make_model(config, 1, 2)
    x = tokens(96)
    changed = x.clone()
    changed[20] = 123  # block 1 (tokens 16..31); smear also reaches token 21, still block 1
    diff = (gpt(changed) - gpt(x)).abs().amax(-1)
    assert diff[:20].max() == 0
    assert (diff[20:48] > 0).all()  # block 1 and 2 see it
    assert diff[48:].max() == 0  # block 3 onwards is out of the window


def test_one_compiled_graph_before_and_after_the_untie(record55_model_config):
    gpt = make_model(record55_model_config)
    compiled = torch.compile(gpt, backend="eager", fullgraph=True, dynamic=False)
    x, y = tokens(64), tokens(64, seed=3)
    compiled(x, y).backward()
    gpt.tie.untie(optimizers.build_optimizer(gpt, optimizers.OptimizerConfig.from_dict(
        run.load_config(Path(M.__file__).parent / "config" / "record55.py")["optimizer_config"])))
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x, y).backward()
        gpt.yarn.set_windows((2, 4))
        compiled(x, y).backward()


def test_blocks_are_identity_at_init(record55_model_config):
    # Zero output projections: every block adds nothing; the residual scalings, the skip and
    # the backout only rescale x0, which the final norm removes. So the logits at init are
    # those of the tied embedding alone.
    torch.manual_seed(0)
    gpt = make_gpt(record55_model_config)
    gpt.yarn.set_windows((1, 2))
    x = tokens(64)
    e = norm(F.embedding(x, gpt.lm_head))  # smear lambda is 0 at init
    expected = kernels.softcap(norm(e) @ gpt.lm_head.T, *gpt.softcap_args)[:, :50257]
    torch.testing.assert_close(gpt(x), expected, atol=1e-5, rtol=1e-5)


def test_every_parameter_has_a_known_group(record55_model_config):
    gpt = make_gpt(record55_model_config)
    for name, p in gpt.named_parameters():
        assert p.label in optimizers.LABEL_GROUPS, name
        assert isinstance(p.lr_mul, float) and isinstance(p.wd_mul, float)
        if p.label in ("attn", "mlp"):
            assert p.ndim >= 2, name


def test_tanh_softcap(record55_model_config):
    gpt = make_gpt(dict(record55_model_config, softcap_form="tanh", logit_softcap=15.0))
    z = torch.tensor([-1000.0, 0.0, 1000.0])
    torch.testing.assert_close(kernels.softcap(z, *gpt.softcap_args),
                               torch.tensor([-15.0, 0.0, 15.0]))


def test_bad_config_is_named(record55_model_config):
    with pytest.raises(ConfigError, match="window_pattern"):
        make_gpt(dict(record55_model_config, window_pattern="SLX"))
    with pytest.raises(ConfigError, match="unknown keys \\['nope'\\]"):
        make_gpt(dict(record55_model_config, nope=1))
    with pytest.raises(ConfigError, match="no attention"):
        make_gpt(dict(record55_model_config, value_embed_layers=((2,),)))


def test_flops_per_token_counts_keys(record55_model_config):
    gpt = make_gpt(record55_model_config)
    T = 64
    docs = torch.zeros(T, dtype=torch.int32)
    keys = {w: dense_attention_mask(docs, w, 16).sum().item() / T for w in (1, 2)}
    matmul = sum(p.numel() for p in gpt.parameters() if p.label in ("attn", "mlp"))
    matmul += gpt.lm_head.numel()
    attention = 4 * 64 * (keys[1] + 2 * keys[2])  # pattern S L - L
    assert gpt.flops_per_token(T, (1, 2)) == pytest.approx(6 * matmul + 3 * attention)


def test_no_graph_breaks(record55_model_config):
    gpt = make_model(record55_model_config)
    x, y = tokens(64), tokens(64, seed=2)
    explanation = torch._dynamo.explain(gpt)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_record55_parameter_count_matches_readme():
    config = run.load_config(Path(M.__file__).parent / "config" / "record55.py")["model_config"]
    with torch.device("meta"):
        gpt = make_gpt(config)
    total = sum(p.numel() for p in gpt.parameters())
    readme = (Path(M.__file__).parent / "README.md").read_text()
    found = re.search(r"`config/record55.py` \| [^|]* \| ([\d,]+) \|", readme)
    assert found and int(found.group(1).replace(",", "")) == total


def test_bf16_compute_keeps_activations_bf16_and_tracks_float32(record55_model_config,
                                                               monkeypatch):
    """The CUDA dtype plan, run on the CPU: with bf16 compute every block's output and the
    hidden states reaching the lm_head op are bf16 (a float32 scalar parameter promoting the
    residual stream would make the lm_head matmul float32 and its (T, V) buffer twice the
    size), the parameters and their gradients stay float32, and the loss and gradients stay
    close to the float32 model's."""
    gpt = make_model(record55_model_config)
    x = tokens(128, doc_starts=(0, 50))
    y = torch.roll(x, -1)
    loss32 = gpt(x, y)
    grads32 = torch.autograd.grad(loss32, list(gpt.parameters()))

    monkeypatch.setattr(M.GPT55, "compute_dtype", staticmethod(lambda inputs: torch.bfloat16))
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
             for b in gpt.blocks]
    op = kernels.linear_softcap_cross_entropy

    def recording_op(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return op(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(kernels, "linear_softcap_cross_entropy", recording_op)
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
