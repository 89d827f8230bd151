"""Tests for optimizers.py (CPU, tiny shapes)."""

import copy
import io
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import gpt_config
from torch import nn

import run
import updates
from optimizers import LABEL_GROUPS, MATRIX_OPTIMIZERS, OptimizerConfig
from optimizers import build_optimizer as build_from_config
from updates import (
    ANVIL_MAPS,
    POLAR_EXPRESS_COEFFS,
    normuon_direction,
    polar_express,
    qr_orthonormal,
    sink_norm,
    sr_sinkhorn,
)
from utils import REPO_ROOT, ConfigError

# -----------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These matrices are tiny: extra threads only add OpenMP overhead, which turns into
    # seconds per test when the other core is busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SPEEDRUN_OPTIMIZER_CONFIG = run.load_config(
    REPO_ROOT / "config" / "record89.py")["optimizer_config"]


def labelled(data, label, lr_mul=1.0, wd_mul=1.0):
    p = nn.Parameter(data)
    p.label, p.lr_mul, p.wd_mul = label, lr_mul, wd_mul
    return p


def make_config(method="normuon", **matrix_overrides):
    cfg = copy.deepcopy(SPEEDRUN_OPTIMIZER_CONFIG)  # a fresh copy: tests edit it
    cfg["matrix_optimizer"] = method
    cfg[method].update(matrix_overrides)
    return cfg


def build_optimizer(named_params, config_dict):
    return build_from_config(named_params, OptimizerConfig.from_dict(config_dict))


def groups(opt):
    """{group: {name: param}} in optimizer order."""
    return {g: {e.name: e.param for e in group.entries} for g, group in opt._groups.items()}


class TinyGPT(nn.Module):
    """Parameters shaped and labelled like the speedrun model's, at toy size."""

    def __init__(self, vocab=24, dim=8, ffn=16, layers=2, heads=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def rand(*shape):
            return 0.5 * torch.randn(*shape, generator=g)

        self.lm_head = labelled(rand(vocab, dim), "lm_head")
        self.embed = labelled(self.lm_head.detach().clone(), "embed")  # tied until untie()
        self.tied = True
        self.value_embed = labelled(rand(vocab, dim), "value_embed")
        self.attn = nn.ParameterList([labelled(rand(4, dim, dim), "attn") for _ in range(layers)])
        self.c_fc = nn.ParameterList([labelled(rand(ffn, dim), "mlp") for _ in range(layers)])
        self.c_proj = nn.ParameterList(
            [labelled(rand(dim, ffn), "mlp", lr_mul=2.0) for _ in range(layers)]
        )
        self.gates = nn.ParameterList([labelled(rand(heads, 12), "gate") for _ in range(layers)])
        self.lambdas = labelled(torch.ones(layers), "scalar")

    def untie(self, opt):
        """As layers.embeddings.EmbeddingTie.untie: the embedding's own gradient from now on,
        starting from the lm_head's optimizer state."""
        self.tied = False
        opt.copy_state(self.embed, self.lm_head)


def fill_grads(model, step):
    """Deterministic gradients that depend on the weights, like real ones; none for the
    embedding while it is tied (the trainer folds it into the lm_head's)."""
    g = torch.Generator().manual_seed(1000 + step)
    for name, p in model.named_parameters():
        if name != "embed" or not model.tied:
            p.grad = 0.3 * p.detach() + torch.randn(p.shape, generator=g)


def singular_values(X):
    return torch.linalg.svdvals(X.double())


def matrix_with_spectrum(rows, cols, spectrum, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = len(spectrum)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.as_tensor(spectrum, dtype=torch.float64)) @ V.T


# -----------------------------------------------------------------------------------------
# Polar Express


def odd_quintic(coeffs, x):
    a, b, c = coeffs
    return a * x + b * x**3 + c * x**5


def optimal_odd_quintic(lo, hi):
    """Minimax odd quintic a x + b x^3 + c x^5 approximating 1 on [lo, hi] (Remez exchange).

    The error equioscillates at lo, the two critical points and hi (p - 1 = -E, +E, -E, +E).
    """
    if lo / hi > 1 - 5e-6:
        # The interval is numerically a point: take the limit polynomial, flat at hi.
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    nodes = [lo, (3 * lo + hi) / 4, (lo + 3 * hi) / 4, hi]
    err = math.inf
    for _ in range(100):
        system = np.array([[x, x**3, x**5, (-1) ** i] for i, x in enumerate(nodes)])
        a, b, c, new_err = np.linalg.solve(system, np.ones(4))
        # The interior nodes move to the roots of p'(x) = a + 3b x^2 + 5c x^4.
        disc = math.sqrt(9 * b * b - 20 * a * c)
        nodes[1] = math.sqrt((-3 * b - disc) / (10 * c))
        nodes[2] = math.sqrt((-3 * b + disc) / (10 * c))
        if abs(new_err - err) <= 1e-15:
            break
        err = new_err
    return float(a), float(b), float(c)


def polar_express_coefficients(steps, lo=1e-3, safety=2e-2, cushion=0.02):
    """The paper's greedy schedule of odd quintics for singular values in [lo, 1].

    Each step takes the minimax quintic on [max(lo, cushion * hi), hi] (the cushion stops the
    first steps from spending their degree on the tiniest singular values), rescales it so that
    p(lo) and p(hi) straddle 1 symmetrically, and, except on the last step, evaluates it at
    x / (1 + safety) so bf16 rounding cannot push values past the next step's interval.
    """
    hi = 1.0
    coeffs = []
    for step in range(steps):
        abc = optimal_odd_quintic(max(lo, cushion * hi), hi)
        scale = 2 / (odd_quintic(abc, lo) + odd_quintic(abc, hi))
        a, b, c = (scale * v for v in abc)
        if step < steps - 1:
            s = 1 + safety
            a, b, c = a / s, b / s**3, c / s**5
        coeffs.append((a, b, c))
        lo = odd_quintic((a, b, c), lo)
        hi = 2 - lo
    return tuple(coeffs)


def test_coefficients_match_the_papers_construction():
    rebuilt = polar_express_coefficients(5, lo=1e-3, safety=2e-2, cushion=0.02)
    np.testing.assert_allclose(np.array(rebuilt), np.array(POLAR_EXPRESS_COEFFS), rtol=1e-12)


@pytest.mark.parametrize("lo, hi", [(0.02, 1.0), (0.3, 1.0), (0.5, 1.5)])
def test_optimal_quintic_equioscillates(lo, hi):
    # Chebyshev: the minimax error alternates -E, +E, -E, +E at lo < x1 < x2 < hi.
    a, b, c = optimal_odd_quintic(lo, hi)
    x = np.linspace(lo, hi, 200_001)
    err = a * x + b * x**3 + c * x**5 - 1
    e_max = np.abs(err).max()
    assert err[0] == pytest.approx(-e_max, rel=1e-6)
    assert err[-1] == pytest.approx(e_max, rel=1e-6)
    interior = err[1:-1]
    i_max, i_min = np.argmax(interior), np.argmin(interior)
    assert interior[i_max] == pytest.approx(e_max, rel=1e-6)
    assert interior[i_min] == pytest.approx(-e_max, rel=1e-6)
    assert i_max < i_min


def test_coefficients_map_the_design_interval_close_to_one():
    # In exact arithmetic the composition sends [1e-3, 1] into [0.858, 1.142].
    x = np.geomspace(1e-3, 1.0, 200_001)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        x = a * x + b * x**3 + c * x**5
    assert x.min() > 0.85 and x.max() < 1.15


def test_the_coefficients_orthogonalise_an_ill_conditioned_matrix_in_float64():
    # Singular values spanning 1e-3..1, free of bf16 rounding: the coefficients' own claim,
    # on the singular values of a real matrix after its Frobenius normalisation.
    G = matrix_with_spectrum(8, 24, np.geomspace(1.0, 1e-3, 8))
    x = singular_values(G / (G.norm() * 1.02)).numpy()
    for coeffs in POLAR_EXPRESS_COEFFS:
        x = odd_quintic(coeffs, x)
    assert x.min() > 0.6 and x.max() < 1.2


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (3, 16, 48)])
def test_polar_express_bf16_random(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    X = polar_express(G)
    assert X.dtype == torch.bfloat16 and X.shape == G.shape
    s = singular_values(X)
    assert s.min() > 0.6 and s.max() < 1.2
    # The output approximates U V^T, not just any orthogonal matrix.
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = U @ Vh
    assert (X.double() - polar).norm() / polar.norm() < 0.2


def test_polar_express_bf16_condition_number_100():
    # In bf16 the input's rounding (~2**-9 of its norm) is as large as l = 1e-3 itself, so
    # the bf16 check uses a spectrum spanning 1e-2..1.
    for seed in range(4):
        G = matrix_with_spectrum(16, 48, np.geomspace(1.0, 1e-2, 16), seed=seed)
        s = singular_values(polar_express(G.float()))
        assert s.min() > 0.6 and s.max() < 1.2


def test_polar_express_batch_equals_per_matrix():
    G = torch.randn(5, 12, 20, generator=torch.Generator().manual_seed(1))
    batched = polar_express(G)
    for i in range(5):
        # Within two bf16 ulps: batched and single matmuls may pick different kernels.
        torch.testing.assert_close(batched[i], polar_express(G[i]), rtol=0, atol=4e-3)


# -----------------------------------------------------------------------------------------
# Update directions


def test_sink_norm_balances_rows_and_columns():
    g = torch.Generator().manual_seed(0)
    tall, wide = torch.randn(12, 5, generator=g), torch.randn(5, 12, generator=g)
    # The side normalised last has exactly unit vectors: columns if tall, rows if wide.
    torch.testing.assert_close(sink_norm(tall).norm(dim=-2), torch.ones(5))
    torch.testing.assert_close(sink_norm(wide).norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(sink_norm(1000 * tall), sink_norm(tall))


def test_sr_sinkhorn_targets():
    X = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    Y = sr_sinkhorn(X, iters=30)
    torch.testing.assert_close(Y.norm(dim=-2), torch.full((10,), math.sqrt(6)))
    torch.testing.assert_close(Y.norm(dim=-1), torch.full((6,), math.sqrt(10)), rtol=1e-4, atol=0)


def test_qr_orthonormal_matches_householder_up_to_column_signs(monkeypatch):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 10, 10, generator=g) @ torch.diag(torch.logspace(0, -4, 10))
    reference = torch.linalg.qr(A.double()).Q
    householder_calls = []
    householder = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda X: householder_calls.append(X) or householder(X))
    Q = qr_orthonormal(A)
    assert not householder_calls  # condition number 1e4: the Cholesky path
    signs = (Q.double() * reference).sum(dim=-2, keepdim=True).sign()
    torch.testing.assert_close(Q.double(), reference * signs, rtol=0, atol=1e-5)
    # A rank-deficient member sends the batch to Householder: still an orthonormal Q.
    A[1, :, 3] = 0
    Q = qr_orthonormal(A).double()
    assert len(householder_calls) == 1
    eye = torch.eye(10, dtype=torch.float64).expand(3, 10, 10)
    torch.testing.assert_close(Q.mT @ Q, eye, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(12, 6), (6, 12)])
def test_normuon_variance_normalisation(shape):
    M = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    rows, cols = shape
    second = torch.zeros((2, rows, 1) if rows >= cols else (2, 1, cols))
    U = normuon_direction(M, second, beta2=0.0)
    ortho = polar_express(M).float()
    # Frobenius norm kept; with beta2 = 0 every neuron of the larger side gets the same RMS.
    torch.testing.assert_close(U.norm(dim=(-2, -1)), ortho.norm(dim=(-2, -1)))
    per_neuron = U.square().mean(dim=-1 if rows >= cols else -2)
    torch.testing.assert_close(per_neuron, per_neuron[..., :1].expand_as(per_neuron))
    assert second.abs().sum() > 0


def test_normuon_second_moment_is_an_ema_with_beta2():
    M = torch.randn(2, 12, 6, generator=torch.Generator().manual_seed(1))
    before = torch.rand(2, 12, 1, generator=torch.Generator().manual_seed(2)) + 0.5
    second = before.clone()
    U = normuon_direction(M, second, beta2=0.9)
    ortho = polar_express(M).float()
    mean_sq = ortho.square().mean(dim=-1, keepdim=True)
    torch.testing.assert_close(second, 0.9 * before + 0.1 * mean_sq)
    scaled = ortho / second.sqrt()  # each neuron by its own RMS, then the norm restored
    expected = scaled * (ortho.norm(dim=(-2, -1), keepdim=True)
                         / scaled.norm(dim=(-2, -1), keepdim=True))
    torch.testing.assert_close(U, expected)


def test_normuon_takes_beta2_from_the_config():
    # One step from zero state with the same gradient: the second moment is (1 - beta2) times
    # the same mean square, so two betas give a ratio of (1 - 0.5) / (1 - 0.9) = 5.
    w0 = torch.randn(3, 12, 8, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(w0.shape, generator=torch.Generator().manual_seed(1))
    seconds = []
    for beta2 in (0.5, 0.9):
        w = labelled(w0.clone(), "attn")
        opt = build_optimizer([("w", w)], make_config("normuon", beta2=beta2))
        w.grad = grad.clone()
        opt.step()
        (entry,) = opt.state_dict()["params"]
        seconds.append(entry["state"]["second_moment"])
    torch.testing.assert_close(seconds[0], 5 * seconds[1])


# -----------------------------------------------------------------------------------------
# The split and the config


def test_split_puts_every_parameter_in_exactly_one_group():
    model = TinyGPT()
    opt = build_optimizer(model, make_config())
    split = groups(opt)
    assert set(split) == {"adam", "matrix", "scalar"}
    seen = [id(p) for members in split.values() for p in members.values()]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    for group, members in split.items():
        for name, p in members.items():
            assert LABEL_GROUPS[p.label] == group, name
    assert all(id(g) in map(id, split["scalar"].values()) for g in model.gates)
    assert len(split["matrix"]) == 6 and len(split["adam"]) == 3


def test_unknown_or_missing_label_is_an_error():
    p = labelled(torch.zeros(3, 3), "mystery")
    with pytest.raises(ValueError, match="mystery") as info:
        build_optimizer([("w", p)], make_config())
    assert "value_embed" in str(info.value) and "'w'" in str(info.value)
    with pytest.raises(ValueError, match="None"):
        build_optimizer([("w", nn.Parameter(torch.zeros(3)))], make_config())
    with pytest.raises(TypeError, match="pairs"):
        build_optimizer([labelled(torch.zeros(2, 3), "mlp")], make_config())


def test_config_is_validated():
    with pytest.raises(ConfigError, match="unknown keys \\['muon'\\]"):
        OptimizerConfig.from_dict({**make_config(), "muon": {}})
    cfg = make_config()
    del cfg["normuon"]["beta2"]
    with pytest.raises(ConfigError, match="normuon: unknown keys \\[\\], missing keys "
                       "\\['beta2'\\]"):
        OptimizerConfig.from_dict(cfg)
    cfg = make_config()
    cfg["aro"]["rms_target"] = 0.2  # a section not chosen is still checked
    with pytest.raises(ConfigError, match="aro: unknown keys \\['rms_target'\\]"):
        OptimizerConfig.from_dict(cfg)
    with pytest.raises(ConfigError, match="Adam labels only"):
        OptimizerConfig.from_dict({**make_config(), "label_betas": {"mlp": (0.9, 0.9)}})
    with pytest.raises(ConfigError, match="unknown labels \\['mystery'\\]"):
        OptimizerConfig.from_dict({**make_config(), "label_lr_mul": {"mystery": 1.0}})
    with pytest.raises(ConfigError, match="matrix_optimizer"):
        OptimizerConfig.from_dict({**make_config(), "matrix_optimizer": "sgd"})
    cfg = make_config("bam")
    del cfg["bam"]
    with pytest.raises(ConfigError, match="lacks the 'bam' section"):
        OptimizerConfig.from_dict(cfg)


# -----------------------------------------------------------------------------------------
# Optimisation behaviour


def least_squares(seed, rows=16, cols=32, cond=1e-3):
    """Full-batch regression whose input covariance has condition number 1 / cond."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g))
    scales = torch.logspace(0, math.log10(cond), cols).sqrt()
    X = torch.randn(256, cols, generator=g) @ (Q * scales) @ Q.T
    Y = X @ torch.randn(rows, cols, generator=g).T
    return X, Y, 0.1 * torch.randn(rows, cols, generator=g)


def regression_loss(W, X, Y):
    return ((X @ W.T - Y) ** 2).mean()


def final_sgd_loss(problem, lr, steps):
    X, Y, W0 = problem
    W = W0.clone().requires_grad_()
    for t in range(steps):
        (grad,) = torch.autograd.grad(regression_loss(W, X, Y), W)
        with torch.no_grad():
            W -= lr * (1 - t / steps) * grad
    return regression_loss(W, X, Y).item()


@pytest.mark.parametrize("method", MATRIX_OPTIMIZERS)
def test_matrix_optimizer_beats_tuned_sgd(method):
    steps = 60
    problem = least_squares(seed=0)
    X, Y, W0 = problem
    start = regression_loss(W0, X, Y).item()
    # SGD's best lr lies inside this grid (about 2**4.5).
    sgd = min(final_sgd_loss(problem, 2 ** (k / 2), steps) for k in range(-4, 14))
    W = labelled(W0.clone(), "mlp")
    opt = build_optimizer([("w", W)], make_config(method, lr=1.0, weight_decay=0.0))
    for t in range(steps):
        opt.set_lr_factor(1 - t / steps)
        regression_loss(W, X, Y).backward()
        opt.step()
        opt.zero_grad()
    final = regression_loss(W, X, Y).item()
    assert final < 0.01 * start
    assert final < 0.3 * sgd


@pytest.mark.parametrize("method, scale", [("normuon", 1024.0), ("bam", 1000.0), ("aro", 1000.0)])
def test_gradient_scale_invariance(method, scale):
    # NorMuon rounds its input to bf16, so it gets a power of two, which bf16 keeps exact.
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 12, 8, generator=g)
    a, b = labelled(w0.clone(), "attn"), labelled(w0.clone(), "attn")
    opt = build_optimizer([("a", a), ("b", b)], make_config(method))
    for _ in range(3):
        grad = torch.randn(w0.shape, generator=g)
        a.grad, b.grad = grad.clone(), scale * grad
        opt.step()
    assert not torch.equal(a.detach(), w0)
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_aro_update_has_rms_point_two_and_an_orthogonal_rotation(shape):
    w0 = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    w = labelled(w0.clone(), "attn", lr_mul=0.5)
    opt = build_optimizer([("w", w)], make_config("aro", lr=0.1, weight_decay=0.0))
    for step in range(2):
        before = w.detach().clone()
        w.grad = 1e-3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(step))
        opt.step()
        delta = before - w.detach()
        expected = 0.1 * 0.5 * 0.2 * math.sqrt(shape[0] * shape[1])
        torch.testing.assert_close(delta.norm(dim=(-2, -1)), torch.full((3,), expected))
    rotation = opt.state_dict()["params"][0]["state"]["rotation"]
    side = min(shape)
    assert rotation.shape == (3, side, side)
    torch.testing.assert_close(rotation.mT @ rotation, torch.eye(side).expand(3, side, side))
    assert not torch.allclose(rotation, torch.eye(side).expand(3, side, side))


@pytest.mark.parametrize("method", MATRIX_OPTIMIZERS)
def test_shape_groups_match_a_per_matrix_loop(method):
    """One stacked call per shape equals optimising every matrix on its own."""
    g = torch.Generator().manual_seed(0)
    shapes = {"attn": (4, 8, 16), "mlp_a": (8, 16), "mlp_b": (16, 8), "mlp_c": (8, 16)}
    init = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    batched = {k: labelled(v.clone(), "attn" if k == "attn" else "mlp") for k, v in init.items()}
    opt = build_optimizer(list(batched.items()), make_config(method))
    # Reference: every matrix (the four QKVO blocks included) in its own optimizer.
    singles = {
        (k, i): labelled(m.clone(), "mlp")
        for k, v in init.items()
        for i, m in enumerate(v.view(-1, *v.shape[-2:]))
    }
    single_opts = {
        key: build_optimizer([(str(key), p)], make_config(method)) for key, p in singles.items()
    }
    for step_grads in grads:
        for k, p in batched.items():
            p.grad = step_grads[k].clone()
        opt.step()
        for (k, i), p in singles.items():
            p.grad = step_grads[k].view(-1, *p.shape)[i].clone()
            single_opts[(k, i)].step()
    for (k, i), p in singles.items():
        got = batched[k].detach().view(-1, *p.shape)[i]
        torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", MATRIX_OPTIMIZERS)
def test_matrix_cautious_weight_decay(method):
    """decay = wd_eff * (lr * f) * lr_eff, applied only where update and weight agree (for
    ANVIL: its slow rail and the weight, the rail after one step 0.02 x the gradient)."""
    lr, wd, f = 0.05, 2.0, 0.7
    w0 = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    results = {}
    for decay_on in (False, True):
        cfg = make_config(method, lr=lr, weight_decay=wd if decay_on else 0.0)
        cfg["label_lr_mul"]["mlp"], cfg["label_wd_mul"]["mlp"] = 2.0, 0.5
        w = labelled(w0.clone(), "mlp", lr_mul=1.5, wd_mul=3.0)
        opt = build_optimizer([("w", w)], cfg)
        opt.set_lr_factor(f)
        w.grad = grad.clone()
        opt.step()
        results[decay_on] = w.detach()
    shape_factor = 1.0 if method == "aro" else math.sqrt(12 / 8)
    lr_eff = lr * f * 2.0 * 1.5 * shape_factor
    update = (w0 - results[False]) / lr_eff
    mask = ((grad if method == "anvil" else update) * w0) >= 0
    assert mask.any() and not mask.all()
    decay = wd * 0.5 * 3.0 * (lr * f) * lr_eff
    expected = w0 - lr_eff * update - decay * w0 * mask
    torch.testing.assert_close(results[True], expected, rtol=1e-5, atol=1e-6)


def test_nesterov_momentum_follows_set_momentum():
    # BAM's direction is simple enough to recompute: SinkNorm of the Nesterov blend.
    momentum, lr = 0.6, 0.1
    w0 = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    w = labelled(w0.clone(), "mlp")
    opt = build_optimizer([("w", w)], make_config("bam", lr=lr, weight_decay=0.0))
    opt.set_momentum(momentum)
    w.grad = g1.clone()
    opt.step()
    w1 = w.detach().clone()
    w.grad = g2.clone()
    opt.step()
    buf = momentum * (1 - momentum) * g1 + (1 - momentum) * g2
    blend = g2 + momentum * (buf - g2)
    torch.testing.assert_close(w.detach(), w1 - lr * sink_norm(blend))


def test_matrix_lr_mul_is_per_parameter_inside_a_stack():
    w0 = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    a, b = labelled(w0.clone(), "mlp"), labelled(w0.clone(), "mlp", lr_mul=2.0)
    opt = build_optimizer([("a", a), ("b", b)], make_config(weight_decay=0.0))
    a.grad = b.grad = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    opt.step()
    torch.testing.assert_close(w0 - b.detach(), 2 * (w0 - a.detach()))


def test_adam_follows_its_formula_with_all_multipliers():
    cfg = make_config()
    cfg["label_lr_mul"]["value_embed"], cfg["label_wd_mul"]["value_embed"] = 3.0, 4.0
    base = cfg["adam"]
    beta1, beta2 = cfg["label_betas"]["value_embed"]
    w0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    w = labelled(w0.clone(), "value_embed", lr_mul=2.0, wd_mul=5.0)
    opt = build_optimizer([("ve", w)], cfg)
    ref, m, v = w0.double(), torch.zeros(6, 4).double(), torch.zeros(6, 4).double()
    for t in range(1, 4):
        f = 1.0 - 0.2 * t
        opt.set_lr_factor(f)
        grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(t))
        # Reference in float64: bias-corrected Adam, decay wd_eff * lr_eff**2 where the update
        # and the weight agree in sign.
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        lr = base["lr"] * f * 3.0 * 2.0
        update = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) * m / (v.sqrt() + base["eps"])
        decay = base["weight_decay"] * 4.0 * 5.0 * lr**2
        ref = ref - update - decay * ref * ((update * ref) > 0)
        w.grad = grad
        opt.step()
        torch.testing.assert_close(w.detach().double(), ref, rtol=1e-6, atol=1e-7)
    assert opt.state_dict()["params"][0]["state"]["step"] == 3


def test_tables_held_then_stepped_at_their_pace():
    """step(tables=False) leaves the embedding tables, their state and their summed gradients
    for a later step, while the other Adam parameters step; table_pace k then equals Adam
    with the tables' betas to the k-th power and k times their decay, set from the config."""
    def build(cfg):
        ve = labelled(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)),
                      "value_embed")
        head = labelled(torch.randn(5, 4, generator=torch.Generator().manual_seed(1)),
                        "lm_head")
        return ve, head, build_optimizer([("ve", ve), ("head", head)], cfg)

    grads = [torch.randn(6, 4, generator=torch.Generator().manual_seed(10 + i))
             for i in range(3)]
    ve, head, opt = build(make_config())
    opt.set_lr_factor(0.7)
    ve.grad, head.grad = grads[0].clone(), torch.ones(5, 4)
    ve_before, head_before = ve.detach().clone(), head.detach().clone()
    opt.step(tables=False)
    opt.zero_grad(tables=False)
    assert torch.equal(ve, ve_before) and not torch.equal(head, head_before)
    assert torch.equal(ve.grad, grads[0]) and head.grad is None
    assert opt.state_dict()["params"][0]["state"]["step"] == 0
    ve.grad += grads[1]
    opt.step(table_pace=2)
    opt.zero_grad()
    ve.grad = grads[2].clone()
    opt.step(table_pace=2)

    cfg = make_config()
    beta1, beta2 = cfg["label_betas"]["value_embed"]
    cfg["label_betas"]["value_embed"] = (beta1**2, beta2**2)
    cfg["label_wd_mul"]["value_embed"] *= 2
    ve_ref, _, ref = build(cfg)
    ref.set_lr_factor(0.7)
    ve_ref.grad = grads[0] + grads[1]
    ref.step()
    ref.zero_grad()
    ve_ref.grad = grads[2].clone()
    ref.step()
    assert torch.equal(ve, ve_ref)
    assert opt.state_dict()["params"][0]["state"]["step"] == 2


def test_bf16_parameters_keep_their_dtype_with_fp32_state():
    w = labelled(torch.randn(8, 16).bfloat16(), "mlp")
    e = labelled(torch.randn(10, 4).bfloat16(), "embed")
    opt = build_optimizer([("w", w), ("e", e)], make_config())
    w0, e0 = w.detach().clone(), e.detach().clone()
    w.grad, e.grad = torch.randn_like(w), torch.randn_like(e)
    opt.step()
    assert w.dtype == e.dtype == torch.bfloat16
    assert not torch.equal(w, w0) and not torch.equal(e, e0)
    states = [p["state"] for p in opt.state_dict()["params"]]
    assert all(t.dtype == torch.float32 for s in states for t in s.values() if torch.is_tensor(t))


# -----------------------------------------------------------------------------------------
# Trainer-facing controls and checkpoints


def train(model, opt, steps, log=None):
    """The trainer's loop, with a schedule, the untie step and a scalar freeze."""
    for step in steps:
        if step == 3:
            model.untie(opt)
        if step == 2:
            opt.freeze_scalars(4)  # still running at the checkpoint after step 4
        opt.set_lr_factor(1.0 - step / 20)
        opt.set_momentum(0.85 + 0.01 * step)
        fill_grads(model, step)
        opt.step()
        opt.zero_grad()
        if log is not None:
            log.append([p.detach().clone() for p in model.parameters()])


@pytest.mark.parametrize("rebuild", ["in_order", "reordered"])
@pytest.mark.parametrize("method", MATRIX_OPTIMIZERS)
def test_checkpoint_resumes_bit_identically(method, rebuild):
    cfg = make_config(method)
    model = TinyGPT()
    opt = build_optimizer(model, cfg)
    train(model, opt, range(5))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    expected = []
    train(model, opt, range(5, 9), expected)

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    fresh = TinyGPT(seed=1)
    fresh.tied = False  # as the checkpointed run, untied at step 3
    named = list(fresh.named_parameters())
    # Rebuild as the run did, or with the parameters in another order: names match.
    opt = build_optimizer(named if rebuild == "in_order" else named[::-1], cfg)
    fresh.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    assert opt.frozen_scalar_steps == 1
    resumed = []
    train(fresh, opt, range(5, 9), resumed)
    for want, got in zip(expected, resumed, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def test_load_rejects_a_mismatched_checkpoint():
    model = TinyGPT()
    state = build_optimizer(model, make_config("normuon")).state_dict()
    with pytest.raises(ValueError, match="normuon"):
        build_optimizer(model, make_config("bam")).load_state_dict(state)
    fewer = [(n, p) for n, p in model.named_parameters() if n != "embed"]
    with pytest.raises(ValueError, match="embed"):
        build_optimizer(fewer, make_config("normuon")).load_state_dict(state)
    other = TinyGPT(ffn=12)
    with pytest.raises(ValueError, match="shape"):
        build_optimizer(other, make_config("normuon")).load_state_dict(state)


def test_freeze_scalars_skips_weights_and_state():
    model = TinyGPT()
    opt = build_optimizer(model, make_config())
    scalars = list(groups(opt)["scalar"].values())
    fill_grads(model, 0)
    opt.step()
    before = [p.detach().clone() for p in scalars]
    state_before = opt.state_dict()
    opt.freeze_scalars(2)
    for step in (1, 2):
        matrix = model.c_fc[0].detach().clone()
        fill_grads(model, step)
        opt.step()
        assert all(p.grad is None for p in scalars)
        assert all(torch.equal(p, b) for p, b in zip(scalars, before, strict=True))
        assert not torch.equal(model.c_fc[0], matrix)
    saved = {p["name"]: p["state"] for p in state_before["params"]}
    for entry in opt.state_dict()["params"]:
        if LABEL_GROUPS[entry["label"]] == "scalar":
            old = saved[entry["name"]]
            assert entry["state"]["step"] == old["step"] == 1
            assert torch.equal(entry["state"]["exp_avg"], old["exp_avg"])
    fill_grads(model, 3)
    opt.step()
    assert not torch.equal(model.lambdas, before[-1])


def test_untie_copies_state_deeply():
    model = TinyGPT()
    opt = build_optimizer(model, make_config())
    for step in range(2):
        fill_grads(model, step)
        opt.step()
    model.untie(opt)
    states = {p["name"]: p["state"] for p in opt.state_dict()["params"]}
    assert states["embed"]["step"] == states["lm_head"]["step"] == 2
    assert torch.equal(states["embed"]["exp_avg_sq"], states["lm_head"]["exp_avg_sq"])
    # Independent copies: stepping only the embedding leaves the lm_head's moments alone.
    opt.zero_grad()
    model.embed.grad = torch.ones_like(model.embed)
    opt.step()
    after = {p["name"]: p["state"] for p in opt.state_dict()["params"]}
    assert torch.equal(after["lm_head"]["exp_avg"], states["lm_head"]["exp_avg"])
    assert not torch.equal(after["embed"]["exp_avg"], states["embed"]["exp_avg"])


def test_copy_state_transposes_and_checks_groups():
    head = labelled(torch.randn(5, 3), "lm_head")
    embed = labelled(torch.randn(3, 5), "embed")
    mlp = labelled(torch.randn(5, 3), "mlp")
    opt = build_optimizer([("head", head), ("embed", embed), ("mlp", mlp)], make_config())
    head.grad = torch.randn(5, 3)
    opt.step()
    opt.copy_state(embed, head)
    states = [p["state"] for p in opt.state_dict()["params"]]
    assert states[1]["step"] == 1 and torch.equal(states[1]["exp_avg"], states[0]["exp_avg"].T)
    with pytest.raises(ValueError, match="'adam' state into a 'matrix'"):
        opt.copy_state(mlp, head)
    with pytest.raises(ValueError, match="two parameters of this optimizer"):
        opt.copy_state(labelled(torch.randn(5, 3), "embed"), head)
    with pytest.raises(ValueError, match="already in the optimizer"):
        build_optimizer([("head", head), ("again", head)], make_config())


def test_zero_grad_and_momentum_bounds():
    model = TinyGPT()
    opt = build_optimizer(model, make_config())
    fill_grads(model, 0)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="momentum"):
        opt.set_momentum(1.0)


def test_split_covers_the_base_model_exactly_once():
    from model import GPT

    base = run.load_config(REPO_ROOT / "config" / "record89.py")
    with torch.device("meta"):
        gpt = GPT(gpt_config(dict(base["model_config"], prefix_prediction=False)))
    split = groups(build_optimizer(gpt, base["optimizer_config"]))
    named = dict(gpt.named_parameters())
    seen = [name for members in split.values() for name in members]
    assert sorted(seen) == sorted(named)  # every parameter, none twice
    assert {n for n in split["adam"]} == {"lm_head", "embed", "bigram.table",
                                          *(f"value_embeds.tables.{i}" for i in range(5))}
    assert all(named[n].label in ("attn", "mlp") for n in split["matrix"])
    assert all(named[n].label in ("scalar", "gate", "resid_lambda", "post_lambda", "mudd",
                                  "mudd_gate") for n in split["scalar"])


# -----------------------------------------------------------------------------------------
# ANVIL against record #92's own code (tests/reference/record92/README.md)

ANVIL_REFERENCE = REPO_ROOT / "tests" / "reference" / "record92" / "anvil.pt"
# The record's inputs, drawn as its harness drew them: bf16 weights (uniform, std 0.5 /
# sqrt(cols)) from seed 100 + i, bf16 gradients (normal, 0.01) from seed 1000 + 10 i + step.
# (shape, the record's matrices); the MLP bank's four matrices alternate c_fc (lr x1) and
# c_proj (lr x2), here two parameters of two matrices each.
ANVIL_PARAMS = {"tall": (64, 32), "wide": (32, 64), "square_bank": (4, 32, 32),
                "mlp_bank": (2, 2, 48, 16)}


def anvil_inputs(steps):
    weights, grads = {}, {}
    for i, (label, shape) in enumerate(ANVIL_PARAMS.items()):
        g = torch.Generator().manual_seed(100 + i)
        bound = 3 ** 0.5 * 0.5 * shape[-1] ** -0.5
        weights[label] = ((torch.rand(shape, generator=g) * 2 - 1) * bound).bfloat16().float()
        grads[label] = [(torch.randn(shape, generator=torch.Generator().manual_seed(
            1000 + 10 * i + k)) * 0.01).bfloat16().float() for k in range(steps)]
    return weights, grads


def anvil_run(scenario, reference):
    """Our ANVIL over the record's three steps: the updates (K, m, n) per step per label, and
    the optimizer's state by label."""
    steps = reference["steps"]
    weights, grads = anvil_inputs(len(steps))
    params = {label: labelled(w.clone(), "attn") for label, w in weights.items()
              if label != "mlp_bank"}
    fc, proj = weights["mlp_bank"].unbind(1)
    params["fc"] = labelled(fc.clone(), "mlp")
    params["proj"] = labelled(proj.clone(), "mlp", lr_mul=2.0)
    config = make_config("anvil")
    config["label_lr_mul"], config["label_wd_mul"] = {}, {}
    opt = build_optimizer(list(params.items()), config)

    def matrices(tensors, label):
        if label == "mlp_bank":
            pair = torch.stack([tensors["fc"], tensors["proj"]], 1)
            return pair.reshape(4, *pair.shape[-2:])
        return tensors[label].reshape(-1, *tensors[label].shape[-2:])

    updates = []
    for k, step in enumerate(steps):
        for label, g in grads.items():
            if label == "mlp_bank":
                params["fc"].grad, params["proj"].grad = g[k].unbind(1)
            else:
                params[label].grad = g[k].clone()
        before = {n: p.detach().clone() for n, p in params.items()}
        opt.set_lr_factor(reference["lr_factor"][k])
        opt.set_momentum(reference["momentum"][k])
        opt.set_step(step)
        opt.step()
        after = {n: p.detach() for n, p in params.items()}
        updates.append({label: matrices(after, label) - matrices(before, label)
                        for label in ANVIL_PARAMS})
    state = {key: {n: opt._by_id[id(p)].state[key] for n, p in params.items()}
             for key in ("momentum_buffer", "slow_buffer", "second_moment")}
    return updates, {key: {label: matrices(by_name, label) for label in ANVIL_PARAMS}
                     for key, by_name in state.items()}


def relative(got, expected):
    expected = expected.reshape(got.shape)
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("scenario", ["early", "engaged"])
def test_anvil_matches_record92(scenario):
    """Steps 0-2 (one rail in effect, the slow one running beside it) and 514-516 (the rails
    blended) from zero state. The rails match to float32 rounding; the updates to 0.6%, the
    spread of bf16 matmuls that round in another order (0.2-0.4% measured; NorMuon's Polar
    Express in ANVIL's place is 8-10% off, the decay gated on the update instead of the slow
    rail 0.9-2%)."""
    reference = torch.load(ANVIL_REFERENCE, weights_only=True)[scenario]
    updates, state = anvil_run(scenario, reference)
    for label, expected in reference["params"].items():
        for k in range(len(reference["steps"])):
            assert relative(updates[k][label], expected["updates"][k]) < 6e-3, (label, k)
        assert relative(state["momentum_buffer"][label], expected["fast"]) < 1e-6, label
        assert relative(state["slow_buffer"][label], expected["slow"]) < 1e-6, label
        assert relative(state["second_moment"][label], expected["lane_energy"]) < 5e-3, label


def test_anvil_maps_hold_singular_values_near_one():
    """The composition of ANVIL_MAPS (float64) on [3e-3, 1/1.05]: within [0.99507, 1.000401],
    as record #92's README states; past 1/1.05 it leaves that band."""
    s = torch.cat([torch.linspace(3e-3, 1 / 1.05, 20001, dtype=torch.float64)])
    x = s.clone()
    for a, b, c in ANVIL_MAPS:
        x = a * x + b * x ** 3 + c * x ** 5
    assert 0.99506 < x.min().item() and x.max().item() < 1.000402
    y = torch.tensor(0.96, dtype=torch.float64)
    for a, b, c in ANVIL_MAPS:
        y = a * y + b * y ** 3 + c * y ** 5
    assert y.item() > 1.01


ADAM_ROWS_CHECK = textwrap.dedent("""
    import torch, updates
    g = torch.Generator().manual_seed(0)
    for dtype, ranks in ((torch.float32, 1), (torch.bfloat16, 3)):
        p = torch.randn(50, 12, generator=g).to(dtype)
        # repeated rows, row 7 in 29 pairs (several of the kernel's blocks); rows 40-49 untouched
        ids = torch.cat([torch.randint(0, 40, (90,), generator=g), torch.full((29,), 7)])
        ids = ids[torch.randperm(ids.numel(), generator=g)]
        grads = torch.randn(ids.numel(), 12, generator=g).to(dtype)
        v = torch.rand(50, 1, generator=g)
        want_p, want_v = p.clone(), v.clone()
        # a decay of 0.3 makes the cautious decay visible beside the step
        updates.adam_rows_reference_(want_p, ids, grads, want_v, 0.9, 1e-8, 0.05, 0.3, ranks)
        updates.kernel_adam_rows_(p, ids, grads, v, 0.9, 1e-8, 0.05, 0.3, ranks)
        torch.testing.assert_close(v, want_v, rtol=1e-6, atol=0)
        # bf16: the interpreter truncates float32 to bf16 where the GPU rounds (tests/test_gpu.py)
        one_step = 1e-6 if dtype == torch.float32 else 2.0 ** -7
        torch.testing.assert_close(p.float(), want_p.float(), rtol=one_step, atol=1e-7)
    # runs placed against the kernel's tiles of 16 sorted pairs: one from the last pair of the
    # first tile through the whole second into the third, one ending on a tile's end, one
    # filling a tile, single pairs in a short last tile
    t = updates.ROWS_TILE
    counts = {3: t - 1, 11: t + 10, 20: t - 9, 31: t, **{row: 1 for row in range(40, 47)}}
    ids = torch.cat([torch.full((n,), row) for row, n in counts.items()])
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    grads = torch.randn(ids.numel(), 12, generator=g)
    p, v = torch.randn(50, 12, generator=g), torch.rand(50, 1, generator=g)
    want_p, want_v = p.clone(), v.clone()
    updates.adam_rows_reference_(want_p, ids, grads, want_v, 0.9, 1e-8, 0.05, 0.3, 2)
    updates.kernel_adam_rows_(p, ids, grads, v, 0.9, 1e-8, 0.05, 0.3, 2)
    torch.testing.assert_close(v, want_v, rtol=1e-6, atol=0)
    torch.testing.assert_close(p, want_p, rtol=1e-6, atol=1e-7)
    print("row-wise Adam matches its reference")
""")


@pytest.mark.skipif(updates.triton is None, reason="triton is not installed")
def test_triton_adam_rows_matches_reference_in_interpreter():
    """The n-gram table's row-wise Adam from (row id, gradient row) pairs: the Triton kernel
    against ``adam_rows_reference_`` (unique + index_add, then the update), float32 and bf16
    weights, the mean over three ranks, repeated (one in many pairs) and untouched rows, runs
    placed across, on and inside the kernel's tiles."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", ADAM_ROWS_CHECK], capture_output=True,
                            text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "row-wise Adam matches its reference" in result.stdout
