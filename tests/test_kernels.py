"""kernels.py: the lm_head + softcapped cross-entropy op against plain PyTorch autograd.

On the CPU the Triton kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported, hence a subprocess); tests/test_gpu.py runs it compiled on a GPU, with the
float8 matmuls.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from utils import REPO_ROOT

SOFTCAP = (23.0, 5.0, 7.5)


def reference(hidden, weight, targets, tanh):
    logits = torch.nn.functional.linear(hidden, weight)
    return kernels.softcap_cross_entropy_reference(logits, targets, *SOFTCAP, tanh)


def gradient(q, inv_sum, target_slope, targets, weights):
    """d loss_row / d logits from ``loss_and_factors``'s factors:
    W q / S - sum_j w_j dc_j onehot(t_j)."""
    grad = q.float() * (inv_sum * weights.sum(-1))[:, None]
    rows = torch.arange(len(targets))
    for j in range(targets.size(1)):
        present = targets[:, j] >= 0
        grad[rows[present], targets[present, j]] -= (target_slope * weights)[present, j]
    return grad


def make_inputs(rows=40, dim=24, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[0], targets[-1] = 0, vocab - 1
    return hidden, weight, targets


def several_targets(rows, vocab, seed=0):
    """Three targets a row with weights (the next tokens and a prefix token, say), some
    absent (-1, weight 0), and one target repeated within a row."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (rows, 3), generator=g)
    weights = torch.rand(rows, 3, generator=g) + 0.1
    targets[-1, 1:] = -1
    targets[-2, 2] = -1
    weights[targets < 0] = 0.0
    targets[0, 2] = targets[0, 0]
    return targets, weights


def weighted_reference(logits, targets, weights, tanh):
    """sum_j w_j CE(row, t_j) by autograd's cross-entropy, one target column at a time."""
    capped = kernels.softcap(logits.float(), *SOFTCAP, tanh)
    return sum(weights[:, j] * torch.nn.functional.cross_entropy(
        capped, targets[:, j].clamp_min(0), reduction="none") for j in range(targets.size(1)))


@pytest.mark.parametrize("tanh", [False, True])
def test_loss_and_factors_give_the_autograd_gradient(tanh):
    logits = (torch.randn(7, 90) * 8).requires_grad_()
    targets, weights = several_targets(7, 90)
    loss, q, inv_sum, slope = kernels.loss_and_factors(logits, targets, weights, *SOFTCAP,
                                                       tanh)
    expected = weighted_reference(logits, targets, weights, tanh)
    expected.sum().backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(gradient(q, inv_sum, slope, targets, weights), logits.grad)
    assert 0 < q.min() and q.max() <= kernels.grad_bound(SOFTCAP[0], SOFTCAP[2], tanh)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_several_weighted_targets_match_autograd(backend):
    hidden, weight, _ = make_inputs()
    targets, weights = several_targets(hidden.size(0), weight.size(0))
    op = kernels.linear_softcap_cross_entropy
    if backend:
        torch._dynamo.reset()
        op = torch.compile(op, backend=backend, fullgraph=True)
    loss = op(hidden, weight, targets, *SOFTCAP, False, weights=weights)
    loss.backward()
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    logits = torch.nn.functional.linear(hidden, weight)
    expected = weighted_reference(logits, targets, weights, False).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


@pytest.mark.parametrize("tanh", [False, True])
@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_linear_softcap_cross_entropy_matches_autograd(tanh, backend):
    """Loss and both gradients equal F.linear + reference loss under autograd, eager and traced
    (aot_eager checks the op's fake and autograd registrations)."""
    hidden, weight, targets = make_inputs()
    op = kernels.linear_softcap_cross_entropy
    if backend:
        torch._dynamo.reset()
        op = torch.compile(op, backend=backend, fullgraph=True)
    (op(hidden, weight, targets, *SOFTCAP, tanh) * 3.0).backward()
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    expected = reference(hidden, weight, targets, tanh)
    (expected * 3.0).backward()
    torch.testing.assert_close(op(hidden, weight, targets, *SOFTCAP, tanh), expected)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


def test_no_gradient_work_without_autograd():
    hidden, weight, targets = make_inputs()
    with torch.no_grad():
        loss = kernels.linear_softcap_cross_entropy(hidden, weight, targets, *SOFTCAP, False)
        empty = torch.empty(0)
        _, *factors = kernels._linear_softcap_ce(hidden, weight, targets[:, None],
                                                  torch.ones(len(targets), 1), empty, empty,
                                                  empty, empty, *SOFTCAP, False, False)
    assert all(f.numel() == 0 for f in factors)
    torch.testing.assert_close(loss, reference(hidden, weight, targets, False))


def test_fp8_is_ignored_where_unsupported():
    hidden, weight, targets = make_inputs()
    assert not kernels.use_fp8(hidden, weight, True)
    loss = kernels.linear_softcap_cross_entropy(hidden, weight, targets, *SOFTCAP, False,
                                                fp8=True)
    torch.testing.assert_close(loss, reference(hidden, weight, targets, False))


def test_fp8_gradient_scale_fits_e5m2():
    for tanh in (False, True):
        scale = kernels._fp8_grad_scale(SOFTCAP[0], SOFTCAP[2], tanh)
        bound = kernels.grad_bound(SOFTCAP[0], SOFTCAP[2], tanh)
        assert kernels.E5M2_MAX / 2 < scale * bound <= kernels.E5M2_MAX


CHECK = textwrap.dedent("""
    import torch, kernels
    torch.manual_seed(0)
    cap, shift, temp = 23.0, 5.0, 7.5
    for tanh in (False, True):
        # rows and vocabularies that are and are not multiples of the kernel's tile
        for rows, vocab in ((70, 300), (64, 256), (3, 1000)):
            logits = (torch.randn(rows, vocab) * 6).to(torch.bfloat16)
            expected = kernels.row_factors(logits, cap, shift, temp, tanh)
            only_loss = kernels.kernel_row_factors(logits, cap, shift, temp, tanh)
            q = torch.empty(rows, vocab, dtype=torch.float32)
            separate = kernels.kernel_row_factors(logits, cap, shift, temp, tanh, q, q_scale=4.0)
            in_place = logits.clone()
            over = kernels.kernel_row_factors(in_place, cap, shift, temp, tanh, in_place)
            for got in (only_loss, separate, over):
                for a, b in zip(got, (expected[0], expected[2])):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(q / 4.0, expected[1], atol=1e-6, rtol=1e-5)
            # written over the bf16 logits: compare at bf16 resolution
            torch.testing.assert_close(in_place.float(), expected[1], atol=2e-3, rtol=1e-2)
    print("kernel matches reference")
""")


@pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
def test_triton_kernel_matches_reference_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                            env=env, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernel matches reference" in result.stdout


TRANSPOSE_CHECK = textwrap.dedent("""
    import torch, kernels
    torch.manual_seed(0)
    for dtype, (rows, cols) in ((torch.bfloat16, (70, 130)), (torch.float8_e5m2, (129, 64)),
                                (torch.float32, (5, 3))):
        x = (torch.randn(rows, cols) * 100).to(dtype)
        got = kernels.kernel_transpose(x)
        assert got.dtype == dtype and got.shape == (cols, rows) and got.is_contiguous()
        # compared as bytes: torch.equal has no float8 kernel
        assert torch.equal(got.view(torch.uint8), x.t().contiguous().view(torch.uint8)), dtype
    try:
        kernels.kernel_transpose(torch.zeros(4, 6).t())
    except ValueError as exc:
        assert "row-major" in str(exc)
    else:
        raise AssertionError("a column-major input was accepted")
    print("transpose matches torch")
""")


@pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
def test_triton_transpose_matches_torch_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", TRANSPOSE_CHECK], capture_output=True,
                            text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transpose matches torch" in result.stdout


def dequantized(x, dtype=torch.float8_e4m3fn):
    x8, scale = kernels.to_float8(x, dtype)
    return x8.float() * scale


def test_to_float8_uses_the_whole_range_and_round_trips():
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 1e-3
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        x8, scale = kernels.to_float8(x, dtype)
        assert x8.dtype == dtype and scale.dtype == torch.float32 and scale.numel() == 1
        assert x8.float().abs().max() == torch.finfo(dtype).max
        mantissa = 3 if dtype == torch.float8_e4m3fn else 2
        torch.testing.assert_close(dequantized(x, dtype), x, rtol=2.0 ** -mantissa, atol=0)


def test_float8_linear_is_the_matmul_of_its_quantized_operands():
    """The forward and both gradients equal float32 matmuls of the dequantized operands
    (e4m3 x and weight, e5m2 output gradient): the float8 path is that and nothing else."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 48, generator=g).requires_grad_()
    weight = (torch.randn(80, 48, generator=g) * 0.05).requires_grad_()
    out_grad = torch.randn(2, 32, 80, generator=g)
    out = kernels.float8_linear(x, weight)
    out.backward(out_grad)
    x_q, w_q = dequantized(x.detach()), dequantized(weight.detach())
    g_q = dequantized(out_grad.reshape(-1, 80), torch.float8_e5m2)
    assert out.shape == (2, 32, 80) and weight.grad.dtype == torch.float32
    torch.testing.assert_close(out, x_q @ w_q.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.reshape(-1, 48), g_q @ w_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, g_q.t() @ x_q.reshape(-1, 48), rtol=1e-5, atol=1e-5)
    # and float8 is what it is: a few percent from the exact product, not zero
    error = (out - x.detach() @ weight.detach().t()).norm() / out.norm()
    assert 1e-3 < error < 0.1


def test_float8_linear_traces_whole_under_compile():
    """dynamo traces the float8 linear, its transposed copies included, in one graph."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g).requires_grad_()
    weight = (torch.randn(80, 48, generator=g) * 0.05).requires_grad_()
    compiled = torch.compile(kernels.float8_linear, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (kernels.float8_linear, compiled):
        out = fn(x, weight)
        results.append((out, *torch.autograd.grad(out.square().sum(), (x, weight))))
    for eager, traced in zip(*results, strict=True):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)


def delayed_pair(scale):
    return torch.tensor(float(scale)), torch.zeros(())


def at_scale(value, scale, dtype):
    """value cast to float8 at a given scale, saturating, and back."""
    top = torch.finfo(dtype).max
    return (value * (1.0 / torch.tensor(scale))).clamp(-top, top).to(dtype).float() * scale


def relu2_mlp_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 48, generator=g).requires_grad_()
    fc = (torch.randn(96, 48, generator=g) * 0.3).requires_grad_()
    proj = (torch.randn(48, 96, generator=g) * 0.1).requires_grad_()
    return x, fc, proj, [torch.randn(64, 48, generator=g) * 1e-2 for _ in range(2)]


def test_float8_relu2_mlp_is_the_matmuls_of_its_quantized_operands():
    """kernels.float8_relu2_mlp (the reference cast on the CPU) equals float32 matmuls of
    dequantized operands: x, the weights and the output's gradient at dynamic scales, the
    hidden activation and its gradient at pre at the delayed scales given, saturating where
    those fall short; the amax buffers take the largest |value| over the calls; the scales
    stay (refresh_scale_ moves them)."""
    x, fc, proj, out_grads = relu2_mlp_inputs()
    post, grad = delayed_pair(0.004), delayed_pair(2.0 ** -19)
    x_q, fc_q, proj_q = (dequantized(t.detach()) for t in (x, fc, proj))
    pre = x_q @ fc_q.t()
    post_q = at_scale(pre.relu().square(), 0.004, torch.float8_e4m3fn)
    assert (pre.relu().square() > 448 * 0.004).any()  # some of post saturates
    dpre_seen = []
    for out_grad in out_grads:
        x.grad = fc.grad = proj.grad = None
        out = kernels.float8_relu2_mlp(x, fc, proj, post, grad)
        out.backward(out_grad)
        g_q = dequantized(out_grad, torch.float8_e5m2)
        dpre = 2 * (g_q @ proj_q) * pre.relu()
        dpre_seen.append(dpre.abs().max())
        dpre_q = at_scale(dpre, 2.0 ** -19, torch.float8_e5m2)
        torch.testing.assert_close(out, post_q @ proj_q.t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(proj.grad, g_q.t() @ post_q, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fc.grad, dpre_q.t() @ x_q, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(x.grad, dpre_q @ fc_q, rtol=1e-5, atol=1e-7)
    assert (dpre_seen[0] > 57344 * 2.0 ** -19) or (dpre_seen[1] > 57344 * 2.0 ** -19)
    torch.testing.assert_close(post[1], pre.relu().square().max(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad[1], max(dpre_seen), rtol=1e-6, atol=0)
    assert post[0] == 0.004 and grad[0] == 2.0 ** -19


def test_float8_relu2_mlp_traces_whole_under_compile():
    """dynamo traces the MLP, its amax buffers' updates in the forward and the backward pass
    included, in one graph: the same outputs, gradients and buffers as eager."""
    x, fc, proj, _ = relu2_mlp_inputs()
    compiled = torch.compile(kernels.float8_relu2_mlp, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (kernels.float8_relu2_mlp, compiled):
        post, grad = delayed_pair(0.01), delayed_pair(2.0 ** -10)
        for scale in (1.0, 3.0):  # two calls: the amax is a running max
            out = fn(x * scale, fc, proj, post, grad)
            results.append((out, *torch.autograd.grad(out.square().sum(), (x, fc, proj))))
        results.append((*post, *grad))
    half = len(results) // 2
    for eager, traced in zip(results[:half], results[half:], strict=True):
        for a, b in zip(eager, traced, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert all(t > 0 for t in results[-1][1::2])


RELU2_CAST_CHECK = textwrap.dedent("""
    import torch, kernels
    g = torch.Generator().manual_seed(0)
    # 70 x 200: ragged against the (64, 128) tile
    pre = torch.randn(70, 200, generator=g).bfloat16()
    grad = (torch.randn(70, 200, generator=g) * 1e-3).bfloat16()
    for dtype, gradient, scale in ((torch.float8_e4m3fn, pre.new_empty(0), 0.01),
                                   (torch.float8_e5m2, grad, 1e-7)):
        scale = torch.tensor(scale)
        q, q_t, amax = kernels.kernel_relu2_cast(pre, gradient, scale, dtype)
        want, want_t, want_amax = kernels.relu2_cast_reference(pre, gradient, scale, dtype)
        assert q.dtype == q_t.dtype == dtype and q.shape == (70, 200) and q_t.shape == (200, 70)
        assert (want.float().abs() == torch.finfo(dtype).max).any()  # saturation is tested
        assert torch.equal(q_t.view(torch.uint8), q.t().contiguous().view(torch.uint8))
        assert amax.item() == want_amax.item()
        # the interpreter's float8 conversion is not the GPU's: it can drop the carry into the
        # next power of two (124.8 / 1 -> 64, not 128), round ties up and flush subnormals;
        # so most elements equal the reference's, the normal ones all within a factor of 2
        # (tests/test_gpu.py: exact but for rare rounding flips)
        same = (q.float() == want.float()).float().mean().item()
        print(dtype, "share of elements equal to the reference's:", same)
        assert same > 0.95
        normal = want.float().abs() >= torch.finfo(dtype).smallest_normal
        ratio = q.float()[normal] / want.float()[normal]
        assert ((ratio >= 0.5) & (ratio <= 2.0)).all()
    print("relu2 cast matches its reference")
""")


@pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
def test_triton_relu2_cast_matches_reference_in_interpreter():
    """The float8 MLP's activation cast kernel (relu^2 forward in e4m3, its gradient at pre in
    e5m2) against ``relu2_cast_reference``: values, saturation, both layouts, the amax."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", RELU2_CAST_CHECK], capture_output=True,
                            text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "relu2 cast matches its reference" in result.stdout
    print(result.stdout)


def test_refresh_scale_is_the_records():
    """kernels.refresh_scale_ against record #92's own _refresh_delayed_scale run on the same
    amax values (tests/reference/record92/README.md): the new scale headroom x amax / the
    format's largest value (amax capped at 1e12), not below the smallest scale, the old one
    kept for a zero or non-finite amax; amax back to zero. The record's constants and first
    scales are DELAYED_SCALING's."""
    reference = json.loads((REPO_ROOT / "tests" / "reference" / "record92" /
                            "delayed_scales.json").read_text())
    dtypes = {"post": torch.float8_e4m3fn, "grad": torch.float8_e5m2}
    constants = reference["constants"]
    assert kernels.DELAYED_SCALING[torch.float8_e4m3fn][0] == constants["FP8_POST_HEADROOM"]
    assert kernels.DELAYED_SCALING[torch.float8_e5m2][0] == constants["FP8_DPRE_HEADROOM"]
    for case in reference["cases"]:
        dtype = dtypes[case["kind"]]
        assert kernels.DELAYED_SCALING[dtype][2] == case["initial_scale_of_the_record"]
        for amax, want in zip(case["amax"], case["scale_after"], strict=True):
            scale, running = torch.tensor(case["scale_before"]), torch.tensor(float(amax))
            kernels.refresh_scale_(scale, running, dtype)
            assert scale.item() == pytest.approx(want, rel=1e-6), (case["kind"], amax)
            assert running.item() == 0.0


def test_linear_falls_back_where_float8_is_unsupported():
    x = torch.randn(3, 16, 32)
    weight = torch.randn(64, 32)
    assert not kernels.use_fp8(x.reshape(-1, 32), weight, True)  # CPU
    torch.testing.assert_close(kernels.linear(x, weight, fp8=True), x @ weight.t())


def relu2_inputs(seed=0, rows=96, dim=64, hidden=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g).bfloat16().requires_grad_()
    fc = (torch.randn(hidden, dim, generator=g) * dim ** -0.5).requires_grad_()
    proj = (torch.randn(dim, hidden, generator=g) * hidden ** -0.5).requires_grad_()
    return x, fc, proj, torch.randn(rows, dim, generator=g).bfloat16()


def relu2_float32(x, fc, proj):
    return torch.relu(x.float() @ fc.t()).square() @ proj.t()


def test_relu2_mlp_forward_is_float8_with_the_given_activation_scale():
    """Record #89's MLP forward (on the CPU: the kernels' reference ops): the up projection of
    the e4m3 x and fc, relu^2 in bf16, the hidden activation quantized with the scale given
    (not its own amax), the down projection in float8; and the next call's scale 1.8 amax/448."""
    x, fc, proj, _ = relu2_inputs()
    act_scale = torch.tensor(0.05)  # post reaches ~12: below 448 * 0.05
    out, next_scale = kernels.relu2_mlp(x, fc, proj, act_scale)
    (x8, xs), (fc8, fs), (p8, ps) = (kernels.to_float8(t) for t in (x, fc, proj))
    pre = (x8.float() * xs) @ (fc8.float() * fs).t()
    post = torch.relu(pre.bfloat16()).square().float()
    assert next_scale.item() == pytest.approx(1.8 * post.max().item() / 448, rel=1e-6)
    post8 = (post / act_scale).clamp(max=448).to(torch.float8_e4m3fn).float() * act_scale
    want = post8 @ (p8.float() * ps).t()
    assert out.dtype == torch.bfloat16 and out.shape == (96, 64)
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    # and it is the MLP, to float8's accuracy
    exact = relu2_float32(x, fc, proj).detach()
    error = ((out.float() - exact).norm() / exact.norm()).item()
    assert 1e-3 < error < 0.1


def test_relu2_mlp_saturates_at_e4m3s_largest_value():
    """A too-small activation scale caps the hidden activation at 448 (no NaN, no inf), as the
    record's kernel does."""
    x, fc, proj, _ = relu2_inputs()
    (x8, x_scale), (fc8, fc_scale) = kernels.to_float8(x), kernels.to_float8(fc)
    post, post8, amax = kernels.relu2_up_reference(x8, fc8, x_scale * fc_scale,
                                                  torch.tensor(1e-6))
    assert post8.float().max().item() == 448.0 and torch.isfinite(post8.float()).all()
    assert amax.item() == post.float().max().item() > 448e-6
    assert (post8.float() < 448).any()  # zeros stay zeros


def test_relu2_mlp_backward_is_the_bf16_gradient_at_the_float8_forward():
    """The backward runs in bf16 from post alone (relu(pre) = sqrt(post)): it must equal the
    float32 gradient of relu(pre)^2 @ proj.T at the forward's own pre, with x and fc (not their
    float8 copies) in the weight and input gradients."""
    x, fc, proj, grad = relu2_inputs(seed=1)
    out, _ = kernels.relu2_mlp(x, fc, proj, torch.tensor(0.05))
    out.backward(grad)
    got = x.grad.float(), fc.grad, proj.grad
    assert x.grad.dtype == torch.bfloat16 and fc.grad.dtype == proj.grad.dtype == torch.float32
    (x8, xs), (fc8, fs) = kernels.to_float8(x), kernels.to_float8(fc)
    relu = torch.relu(((x8.float() * xs) @ (fc8.float() * fs).t()).bfloat16().float())
    grad_pre = 2 * relu * (grad.float() @ proj.detach())
    want = (grad_pre @ fc.detach(), grad_pre.t() @ x.detach().float(),
            grad.float().t() @ relu.square())
    for name, a, b in zip(("x", "fc", "proj"), got, want, strict=True):
        error = ((a - b).norm() / b.norm()).item()
        assert error < 1.5e-2, (name, error)
    # and the MLP's gradient, to float8's accuracy
    x.grad = fc.grad = proj.grad = None
    relu2_float32(x, fc, proj).backward(grad.float())
    for name, a, b in zip(("x", "fc", "proj"), got, (x.grad.float(), fc.grad, proj.grad),
                          strict=True):
        assert ((a - b).norm() / b.norm()).item() < 0.1, name


def test_relu2_mlp_traces_whole_under_compile():
    x, fc, proj, grad = relu2_inputs(seed=2)
    act_scale = torch.tensor(0.01)
    want, want_scale = kernels.relu2_mlp(x, fc, proj, act_scale)
    want.backward(grad)
    want_grads = x.grad, fc.grad, proj.grad
    x.grad = fc.grad = proj.grad = None
    compiled = torch.compile(kernels.relu2_mlp, backend="aot_eager", fullgraph=True)
    got, got_scale = compiled(x, fc, proj, act_scale)
    got.backward(grad)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_scale, want_scale)
    for a, b in zip((x.grad, fc.grad, proj.grad), want_grads, strict=True):
        torch.testing.assert_close(a, b)
