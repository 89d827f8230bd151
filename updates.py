"""The arithmetic of one optimizer step, for ``optimizers.py`` to apply: Polar Express and
ANVIL's cascade (approximate polar factors in bf16), the matrix methods' directions (NorMuon,
BAM, ARO-Sinkhorn, ANVIL), cautious weight decay, Adam's update, a shape group's whole
matrix step (momentum, direction, update), compiled on CUDA, and record #92's row-wise Adam of
the n-gram table from its held gradient rows (a Triton kernel on CUDA, at the end)."""

import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: the PyTorch reference of the row-wise Adam
    triton = None

# Smallest divisor for norms: small enough that any non-zero input keeps scale invariance.
_TINY = 1e-30


# -----------------------------------------------------------------------------------------
# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932)

# The paper's greedy schedule of five odd quintics for singular values in [1e-3, 1] (safety
# 2e-2, cushion 0.02): the values modded-nanogpt uses. Hard-coded so every machine runs
# bit-identical constants; tests/test_optimizers.py rebuilds them from the paper's
# construction.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(G: Tensor) -> Tensor:
    """Approximate the polar factor U V^T of every matrix in G (..., m, n), in bf16 (the
    speedrun's choice)."""
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    batch = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])  # (K, m, n): baddbmm's shape
    # The Frobenius norm bounds the spectral norm; 1.02 leaves headroom for bf16 rounding.
    X = (X / (X.float().norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-7)).bfloat16()
    X = _quintics(X, POLAR_EXPRESS_COEFFS).view(*batch, *X.shape[-2:])
    return X.mT if tall else X


def _quintics(X: Tensor, coeffs, A: Tensor | None = None) -> Tensor:
    """X <- a X + (b A + c A A) X for each (a, b, c), A the Gram X X^T (``A``, if given, the
    first one): a wide X (K, m, n), m <= n, whose Gram is the smaller side's."""
    for a, b, c in coeffs:
        if A is None:
            A = X @ X.mT
        # b A + c A A, then a X + B X: the scaled sums run in the matmuls' epilogues
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
        A = None
    return X


# ANVIL's cascade (modded-nanogpt record #92, "ANVIL2", commit fd1b14a5): six odd quintics
# re-derived for singular values in [3e-3, 1/1.05], where their composition stays within
# [0.99507, 1.000401]. Past 1/1.05 it diverges, so they go with their own normalisation
# (``anvil_cascade``), never with ``polar_express``'s 1.02.
ANVIL_MAPS = (
    (3.923798038567, -6.095026865488, 3.905234618423),
    (3.278126713798, -3.328923386476, 0.989127286973),
    (3.505298394150, -5.137358782410, 1.968325560615),
    (2.815058591845, -3.685181239622, 1.417196497642),
    (2.245503932403, -2.443826979899, 0.963091710461),
    (2.256537145403, -2.166840097229, 0.929501253245),
)


def anvil_cascade(G: Tensor) -> Tensor:
    """ANVIL's approximate polar factor of every matrix in G (K, m, n), in bf16 as the record:
    divided by 1.05 sqrt(trace(X X^T)) + 1e-6 (the Frobenius norm, from the first Gram, which
    is rescaled rather than computed again), then the six maps."""
    tall = G.size(-2) > G.size(-1)
    X = (G.mT if tall else G).bfloat16()
    A = X @ X.mT  # the Gram on the smaller side, as in polar_express
    d = A.float().diagonal(dim1=-2, dim2=-1).sum(-1).sqrt()[:, None, None] * 1.05 + 1e-6
    X = _quintics((X.float() / d).bfloat16(), ANVIL_MAPS, (A.float() / d.square()).bfloat16())
    return X.mT if tall else X


# -----------------------------------------------------------------------------------------
# Per-shape-group update directions. Each takes a stack (K, rows, cols) of fp32 momenta and
# works on all K matrices at once, so torch.compile can wrap it later.


def _normalize(X: Tensor, dim: int, target: float = 1.0) -> Tensor:
    return X * (target / X.norm(dim=dim, keepdim=True).clamp_min(_TINY))


def normuon_direction(M: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """Polar Express, then NorMuon's neuron-wise variance normalisation (arXiv:2510.05491)."""
    return equalize_lanes(polar_express(M).float(), second_moment, beta2)


def equalize_lanes(ortho: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """NorMuon's normalisation (ANVIL's "isotropic lanes"): ``second_moment`` (updated in
    place) holds an EMA of the mean square of the orthogonalised update, one value per index
    of the larger dimension; each such lane is scaled by its rsqrt, and the whole rescaled to
    the Frobenius norm it had before."""
    reduce_dim = -1 if ortho.size(-2) >= ortho.size(-1) else -2
    mean_sq = ortho.square().mean(dim=reduce_dim, keepdim=True)
    second_moment.lerp_(mean_sq, 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt()
    # ||ortho||^2 and ||ortho * scale||^2 both follow from mean_sq, saving a pass over ortho.
    before = mean_sq.sum(dim=(-2, -1), keepdim=True)
    after = (mean_sq * scale.square()).sum(dim=(-2, -1), keepdim=True)
    return ortho * (scale * (before / after.clamp_min(_TINY)).sqrt())


def sink_norm(M: Tensor) -> Tensor:
    """BAM's single SinkNorm pass: L2-normalise rows then columns (columns then rows if wide).

    The side normalised last has the fewer vectors, so the result has the Frobenius norm
    sqrt(min(rows, cols)) of a semi-orthogonal matrix.
    """
    if M.size(-2) > M.size(-1):
        return _normalize(_normalize(M, -1), -2)
    return _normalize(_normalize(M, -2), -1)


def sr_sinkhorn(X: Tensor, iters: int) -> Tensor:
    """SR-Sinkhorn: alternately scale rows to norm sqrt(n) and columns to norm sqrt(m)."""
    m, n = X.shape[-2:]
    for _ in range(iters):
        X = _normalize(X, -1, math.sqrt(n))
        X = _normalize(X, -2, math.sqrt(m))
    return X


def qr_orthonormal(A: Tensor) -> Tensor:
    """The Q of A = QR for a batch of square matrices.

    CholeskyQR2 in float64 (Q = A chol(A^T A)^-T, twice) is a handful of batched kernels,
    where cuSOLVER's Householder QR runs one matrix at a time. It is the same factorisation up
    to column signs, which ARO's update ignores.
    Rank-deficient or very ill-conditioned inputs fall back to Householder.
    """
    Q = A.double()
    for _ in range(2):
        L, _ = torch.linalg.cholesky_ex(Q.mT @ Q)
        Q = torch.linalg.solve_triangular(L.mT, Q, upper=True, left=False)
    eye = torch.eye(A.size(-1), dtype=Q.dtype, device=Q.device)
    # One host sync; a failed Cholesky leaves NaNs or a non-orthonormal Q, caught here.
    if (Q.mT @ Q - eye).abs().amax() < 1e-6:
        return Q.to(A.dtype)
    return torch.linalg.qr(A).Q


def aro_direction(M: Tensor, rotation: Tensor, iters: int, rms: float) -> tuple[Tensor, Tensor]:
    """ARO with a Sinkhorn base step (Gong et al. 2026, arXiv:2602.09006).

    R <- QR(M f(R^T M)^T), update = R f(R^T M) with f = SR-Sinkhorn, rescaled to RMS ``rms``.
    The rotation acts on the smaller side (tall inputs are transposed), so ``rotation`` is
    (K, s, s) with s = min(rows, cols). Returns the update and the new rotation. Every step
    is invariant to the scale of M.
    """
    tall = M.size(-2) > M.size(-1)
    if tall:
        M = M.mT
    base = sr_sinkhorn(rotation.mT @ M, iters)
    rotation = qr_orthonormal(M @ base.mT)
    U = rotation @ sr_sinkhorn(rotation.mT @ M, iters)
    m, n = M.shape[-2:]
    U = _normalize(U, (-2, -1), rms * math.sqrt(m * n))
    return (U.mT if tall else U), rotation


def cautious_update(P: Tensor, U: Tensor, lr: Tensor | float, decay: Tensor | float,
                    gate: Tensor | None = None) -> Tensor:
    """P - lr U, decaying P by ``decay`` only where U (or ``gate``: ANVIL's slow rail) and P
    agree in sign.

    ``>= 0`` follows modded-nanogpt's NorMuon: a zero update still lets the weight decay.
    """
    mask = ((U if gate is None else gate) * P) >= 0
    return P - lr * U - decay * P * mask


def adam_update_(
    p: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    betas: tuple[float, float],
    eps: float,
    step_size: Tensor | float,
    decay: Tensor | float,
) -> None:
    """One Adam step on ``p`` and its fp32 moments, all in place.

    ``step_size`` carries the lr and both bias corrections. Weight decay is decoupled and
    cautious; ``> 0`` follows modded-nanogpt's Adam. Row-wise (record #92's n-gram table): an
    empty ``exp_avg`` (no momentum) and a (rows, 1) ``exp_avg_sq``, the mean of a row's squared
    gradients.
    """
    beta1, beta2 = betas
    g = grad.float()
    if exp_avg.numel():
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    else:
        exp_avg_sq.mul_(beta2).add_(g.square().mean(-1, keepdim=True), alpha=1 - beta2)
    momentum = exp_avg if exp_avg.numel() else g
    update = momentum.div(exp_avg_sq.sqrt().add_(eps)).mul_(step_size)
    update.add_(p * ((update * p) > 0) * decay)
    p.sub_(update)


def adam_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor], betas: list[tuple[float, float]], eps: float,
               step_sizes: Tensor | list[float], decays: Tensor | list[float]) -> None:
    """``adam_update_`` on each parameter of a list, with its betas, step size and decay."""
    for i, p in enumerate(params):
        adam_update_(p, grads[i], exp_avgs[i], exp_avg_sqs[i], betas[i], eps, step_sizes[i],
                     decays[i])


def matrix_update(M: Tensor, weights: Tensor, state: dict, method: str, hp: dict, lr: Tensor,
                  decay: Tensor) -> Tensor:
    """New weights from the Nesterov momentum ``M``: the method's direction, then the cautious
    update; ``state`` is updated in place (ARO's rotation is replaced in the dict)."""
    if method == "normuon":
        U = normuon_direction(M, state["second_moment"], hp["beta2"])
    elif method == "anvil":
        U = equalize_lanes(anvil_cascade(M).float(), state["second_moment"], hp["beta2"])
        return cautious_update(weights, U, lr, decay, gate=state["slow_buffer"])
    elif method == "bam":
        U = sink_norm(M)
    else:
        U, state["rotation"] = aro_direction(M, state["rotation"], hp["sinkhorn_iters"],
                                             hp["rms"])
    return cautious_update(weights, U, lr, decay)


def matrix_step_(weights: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor]],
                 method: str, hp: dict, momentum: Tensor | float, lr_scale: Tensor | float,
                 decay_scale: Tensor | float, lr_mul: Tensor, wd_mul: Tensor,
                 fast_beta: Tensor | float = 0.0, fast_weight: Tensor | float = 1.0) -> None:
    """One step of a shape group's matrices, all in place.

    ``weights``, ``grads`` and each list of ``state`` hold the same run of matrices in pieces
    of shape (k, rows, cols) (the group's parameters, or this rank's share of them); they are
    stacked here, where under torch.compile the stacking and the writes back fuse into the
    update's kernels. Nesterov momentum in fp32, as in the speedrun; a matrix's lr is
    lr_mul * lr_scale and its decay wd_mul * decay_scale * lr ((K, 1, 1) columns).

    ANVIL's two rails: the momentum buffer (the fast rail, EMA ``fast_beta``) and a slow one
    (``hp["slow_beta"]``); the Nesterov step looks ahead to their blend, ``fast_weight`` of
    the fast one. Before its engage step ANVIL passes fast_beta = momentum and fast_weight = 1:
    the others' momentum, with the slow rail running beside it.
    """
    stacked = {key: torch.cat(pieces) for key, pieces in state.items()}
    G = torch.cat(grads).float()
    buf = stacked["momentum_buffer"]
    if method == "anvil":
        buf.lerp_(G, 1 - fast_beta)
        slow = stacked["slow_buffer"]
        slow.lerp_(G, 1 - hp["slow_beta"])
        M = G.lerp(fast_weight * buf + (1 - fast_weight) * slow, momentum)
    else:
        buf.lerp_(G, 1 - momentum)
        M = G.lerp(buf, momentum)
    lr = lr_mul * lr_scale
    new = matrix_update(M, torch.cat(weights).float(), stacked, method, hp, lr,
                        wd_mul * decay_scale * lr)
    for key, pieces in state.items():
        _write_pieces_(pieces, stacked[key])
    _write_pieces_(weights, new)


def _write_pieces_(pieces: list[Tensor], stacked: Tensor) -> None:
    for piece, part in zip(pieces, stacked.split([p.size(0) for p in pieces]), strict=True):
        piece.copy_(part)


# On CUDA the updates run compiled: a few fused kernels where eager PyTorch launches dozens
# over the same tensors. Values that change every step come in as device tensors
# (``device_scalars``), so the graphs compile once (in the trainer's warm-up).
compiled_adam_step_ = torch.compile(adam_step_, fullgraph=True, dynamic=False)
compiled_matrix_step_ = torch.compile(matrix_step_, fullgraph=True, dynamic=False)


def device_scalars(values: list[float], device: torch.device) -> Tensor:
    """float32 values on ``device``, copied from pinned memory without a host sync."""
    return torch.tensor(values, dtype=torch.float32).pin_memory().to(device, non_blocking=True)


# The n-gram table's row-wise Adam (record #92) from the (row id, gradient row) pairs held since
# its last step: the reference sums the pairs per row with unique + index_add (a float32 copy
# of every pair, then gathers and scatters of the rows' weights, each a pass over gigabytes);
# the kernel sorts the ids and lets one program sum a row's pairs and move that row, reading
# each pair and the row once.
def sum_rows(ids: Tensor, grads: Tensor, ranks: int = 1) -> tuple[Tensor, Tensor]:
    """The distinct row ids (sorted) and, in float32, the sum of each one's gradient rows
    divided by ``ranks`` (the mean over the ranks that gathered them)."""
    rows, inverse = torch.unique(ids, return_inverse=True)
    summed = torch.zeros(rows.numel(), grads.size(1), dtype=torch.float32, device=grads.device)
    summed.index_add_(0, inverse, grads.float())
    if ranks > 1:  # in place: the rows are gigabytes
        summed /= ranks
    return rows, summed


def adam_rows_reference_(p: Tensor, ids: Tensor, grads: Tensor, exp_avg_sq: Tensor,
                         beta2: float, eps: float, step_size: float, decay: float,
                         ranks: int = 1) -> None:
    """Row-wise Adam (no momentum, one second moment a row: the mean of the row's squared
    gradients) of a parameter whose gradient is zero but on the rows in ``ids``, where it is
    the sum of their ``grads`` over ``ranks``: every row's second moment decays, only the
    rows with gradient move (cautious decay included), in float32 and rounded to the weights'
    dtype once. The dense update's numbers (``adam_update_``, which rounds bf16 weights'
    decay term to bf16 on the way)."""
    rows, grad = sum_rows(ids, grads, ranks)
    exp_avg_sq.mul_(beta2).index_add_(0, rows, grad.square().mean(-1, keepdim=True),
                                      alpha=1 - beta2)
    update = grad.div(exp_avg_sq[rows].sqrt().add_(eps)).mul_(step_size)
    old = p[rows].float()
    update.add_(old * ((update * old) > 0) * decay)
    p.index_copy_(0, rows, (old - update).to(p.dtype))


def adam_rows_(p: Tensor, ids: Tensor, grads: Tensor, exp_avg_sq: Tensor, beta2: float,
               eps: float, step_size: float, decay: float, ranks: int = 1) -> None:
    """``adam_rows_reference_``; on CUDA by the Triton kernel."""
    if p.is_cuda and triton is not None:
        kernel_adam_rows_(p, ids, grads, exp_avg_sq, beta2, eps, step_size, decay, ranks)
    else:
        adam_rows_reference_(p, ids, grads, exp_avg_sq, beta2, eps, step_size, decay, ranks)


def kernel_adam_rows_(p: Tensor, ids: Tensor, grads: Tensor, exp_avg_sq: Tensor, beta2: float,
                      eps: float, step_size: float, decay: float, ranks: int = 1) -> None:
    """The Triton kernel behind ``adam_rows_`` (on any device under TRITON_INTERPRET=1). The
    ids are sorted (stably: each row's pairs in the order they were held) and each pair given
    the end of its row's run by a search, so no size depends on the data: no host sync. A
    program a tile of ROWS_TILE sorted pairs does the rows whose run starts in the tile."""
    if p.dim() != 2 or p.stride(1) != 1 or grads.stride(1) != 1:
        raise ValueError("adam_rows_ takes row-major 2-D weights and gradient rows")
    sorted_ids, order = torch.sort(ids, stable=True)
    ends = torch.searchsorted(sorted_ids, sorted_ids, right=True)
    exp_avg_sq.mul_(beta2)
    _adam_rows_kernel[(triton.cdiv(ids.numel(), ROWS_TILE),)](
        p, exp_avg_sq, grads, order, sorted_ids, ends, ids.numel(), p.size(1), p.stride(0),
        grads.stride(0), 1 - beta2, eps, step_size, decay, float(ranks), TILE=ROWS_TILE,
        BLOCK_D=triton.next_power_of_2(p.size(1)), IEEE=grads.dtype == torch.float32,
        num_warps=ROWS_WARPS)


# Sorted pairs a program (16: tl.dot's smallest side). One program a pair, as before 2026-12-07,
# spent most of the kernel's time starting programs with nothing to do, each row's chain of
# dependent loads waited on alone
ROWS_TILE, ROWS_WARPS = 16, 8

if triton is not None:

    @triton.jit
    def _adam_rows_kernel(p_ptr, v_ptr, g_ptr, order_ptr, sorted_ptr, ends_ptr, n, D, p_stride,
                          g_stride, one_minus_beta2, eps, step_size, decay, ranks,
                          TILE: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        """Sorted pairs [TILE * program, + TILE): each one that starts its row's run (a head)
        sums the run's gradients / ranks in float32, those in the tile by a 0/1 matrix product
        (each product exact, summed in float32), the rest of the last run TILE pairs at a
        time; then the row's (already decayed) second moment plus (1 - beta2) times their mean
        square, and the cautious Adam update of its weights."""
        first = tl.program_id(0) * TILE
        pos = first + tl.arange(0, TILE)
        held = pos < n
        row = tl.load(sorted_ptr + pos, mask=held, other=-1)
        previous = tl.load(sorted_ptr + pos - 1, mask=held & (pos > 0), other=-1)
        head = held & (row != previous)
        if tl.sum(head.to(tl.int32), axis=0) > 0:  # else the tile lies inside a run
            cols = tl.arange(0, BLOCK_D)
            in_row = cols < D
            # the rows' weights and second moments load while the gradients are summed
            safe = tl.where(head, row, 0).to(tl.int64)
            moved = head[:, None] & in_row[None, :]
            weights = p_ptr + safe[:, None] * p_stride + cols[None, :]
            old = tl.load(weights, mask=moved, other=0.0)
            v = tl.load(v_ptr + safe, mask=head, other=1.0)
            pairs = tl.load(order_ptr + pos, mask=held, other=0)
            block = tl.load(g_ptr + pairs[:, None].to(tl.int64) * g_stride + cols[None, :],
                            mask=held[:, None] & in_row[None, :], other=0.0)
            # run[h] counts the heads up to pair h: pair j is in head h's run where they match
            run = tl.cumsum(head.to(tl.int32), axis=0)
            member = head[:, None] & (run[:, None] == run[None, :])
            # bf16 gradients are exact in tf32 (tensor cores); float32 ones take the exact path
            if IEEE:
                grad = tl.dot(member.to(tl.float32), block.to(tl.float32),
                              input_precision="ieee")
            else:
                grad = tl.dot(member.to(tl.float32), block.to(tl.float32),
                              input_precision="tf32")
            # the last run may go on past the tile: its head sums the rest
            last = tl.load(ends_ptr + tl.minimum(first + TILE, n) - 1)
            rest = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for start in range(first + TILE, last, TILE):
                more = start + tl.arange(0, TILE) < last
                pairs = tl.load(order_ptr + start + tl.arange(0, TILE), mask=more, other=0)
                chunk = tl.load(g_ptr + pairs[:, None].to(tl.int64) * g_stride + cols[None, :],
                                mask=more[:, None] & in_row[None, :], other=0.0)
                rest += tl.sum(chunk.to(tl.float32), axis=0)
            is_last = head & (run == tl.max(run, axis=0))
            grad += tl.where(is_last[:, None], rest[None, :], 0.0)
            if ranks > 1.0:
                grad = tl.div_rn(grad, ranks)
            v += one_minus_beta2 * (tl.sum(grad * grad, axis=1) / D)
            tl.store(v_ptr + safe, v, mask=head)
            update = tl.div_rn(grad, tl.sqrt_rn(v)[:, None] + eps) * step_size
            old = old.to(tl.float32)
            update += tl.where(update * old > 0, old, 0.0) * decay
            tl.store(weights, (old - update).to(p_ptr.dtype.element_ty), mask=moved)
