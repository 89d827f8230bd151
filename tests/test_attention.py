"""layers/attention.py: the attention layer against attention written out plainly."""

import torch
import torch.nn.functional as F
from conftest import make_gpt

from layers.core import norm
from layers.masks import dense_attention_mask
from layers.rotary import apply_rotary


def reference_attention(attn, x, ve, mask, rotary, scale):
    """Attention written out plainly, with value gate 1 and output gate 1/2 (their init)."""
    w = attn.qkvo
    q, k, v = (F.linear(x, w[i]).view(1, x.size(1), 2, 32) for i in range(3))
    q, k = apply_rotary(norm(q), *rotary), apply_rotary(norm(k), *rotary)
    v = v + ve.view_as(v)
    y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                       attn_mask=mask, scale=scale.item())
    return (0.5 * y.transpose(1, 2)).flatten(2) @ w[3]


def test_gates_start_at_documented_values(record55_model_config):
    torch.manual_seed(0)
    gpt = make_gpt(record55_model_config)
    attn = gpt.blocks[0].attn
    x, ve = torch.randn(1, 32, 64), torch.randn(1, 32, 64)
    mask = dense_attention_mask(torch.zeros(32, dtype=torch.int32), 2, 16)
    with torch.no_grad():
        attn.qkvo[3].normal_()
        rotary = gpt.yarn.tables(32)
        got = attn(x, ve, mask, rotary, gpt.yarn.attn_scale)
        expected = reference_attention(attn, x, ve, mask, rotary, gpt.yarn.attn_scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert gpt.skips.lambdas.tolist() == [-1.5] and gpt.smear.strength.item() == 0.0
