"""Fused and float8 ops, each with the plain PyTorch it must equal: the lm_head and its
softcapped cross-entropy as one op, a float8 linear layer, the float8 relu^2 MLP at record
#92's delayed scales (``float8_relu2_mlp``, its Triton cast kernel) and record #89's relu^2 MLP
(``relu2_mlp``, its two Triton kernels). The n-gram table's row-wise Adam kernel is with the
optimizer's arithmetic (``updates.adam_rows_``).

The speedrun's loss takes (T, V) logits = hidden @ W.T, softcaps them and takes the
cross-entropy in float32. Left to autograd that keeps the logits for the backward pass and then
allocates their gradient beside them: two (T, V) buffers, 13 GB at T = 64K. Here the forward
pass also computes the logits' gradient (a mean loss has no other consumer), in one read of the
logits, and the backward pass is then the two matmuls and a few (T, D)-sized operations.

One read is enough because the softcap bounds the logits c to [0, cap] (sigmoid form) or
[-cap, cap] (tanh form), so e = exp(c - cap) needs no running max and cannot overflow. Row by
row, with dc the softcap's slope, S = sum(e) and t the target,

    d loss / d z = e * dc / S - dc_t * onehot(t),

so the kernel writes q = e * dc as it reads (the logits' own buffer in bf16), sums e, and ends
with log(S) + cap and 1 / S; the targets' c_t and dc_t are gathered before it (the loss of a
row is log(S) + cap - c_t). The backward pass scales rows by 1 / S around the matmuls and
subtracts the one-hot part as a gather (input gradient) and a scatter-add (weight gradient) of
T rows. A row may have several targets with weights (multi-token and prefix-token
prediction): the loss is then sum_j w_j (log(S) + cap - c_j), the gradient
(sum_j w_j) q / S - sum_j w_j dc_j onehot(t_j), one gather and scatter-add a target.

With ``fp8`` on a GPU of compute capability 8.9 or later the three matmuls run in float8
(torch._scaled_mm): hidden and W in e4m3 with one dynamic scale each, q in e5m2 with a fixed
power-of-two scale that its bound allows (e <= 1). float8 matmuls take both operands K-major, so
the weight gradient's takes q transposed, by a tiled Triton kernel. The one-hot part stays out
of float8: stored in e5m2 with q it would carry only 2 mantissa bits (README, Speed, gives the
errors). Elsewhere ``fp8`` is ignored and the matmuls run in the inputs' dtype.

``linear(x, weight, fp8=True)`` runs x @ weight.T and both of its backward matmuls in float8
with one dynamic scale per tensor (e4m3 for x and the weight, e5m2 for the output's gradient).
It is plain torch ops under torch.compile, so inductor fuses the scaling, casts and the
transposes that the weight gradient's float8 layout needs into the neighbouring kernels. A
dynamic scale costs a pass over the tensor for its amax before the cast can start.
``float8_relu2_mlp`` is the relu^2 MLP on that path with record #92's delayed scales for the
hidden activation and its gradient (the previous step's amax with headroom): relu^2 (or its
gradient), the cast and the amax in one pass, a Triton kernel (``relu2_cast``), then the
transposed float8 copy by the transpose kernel.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # no triton (macOS, some CPU-only installs): the PyTorch path is used
    triton = None

BLOCK_ROWS, BLOCK_COLS, LOSS_WARPS = 64, 128, 8  # the loss kernel's tile (logit rows x
# vocabulary columns) and warps
BLOCK_T = 64  # tile side of the transpose kernel
E5M2_MAX = 57344.0


def softcap(z: Tensor, cap: float, shift: float, temp: float, tanh: bool) -> Tensor:
    """cap * tanh(z / cap), or cap * sigmoid((z + shift) / temp)."""
    if tanh:
        return cap * torch.tanh(z / cap)
    return cap * torch.sigmoid((z + shift) / temp)


def softcap_cross_entropy_reference(logits, targets, cap, shift, temp, tanh):
    """Mean cross-entropy of softcapped logits, in float32: what the fused op computes."""
    return F.cross_entropy(softcap(logits.float(), cap, shift, temp, tanh), targets)


def grad_bound(cap: float, temp: float, tanh: bool) -> float:
    """Largest softcap slope dc, hence the largest |q| = e * dc (e <= 1), and the largest
    |d loss_row / d z| (|softmax - onehot| <= 1 times the slope)."""
    return 1.0 if tanh else cap / (4.0 * temp)


def capped_and_slope(z: Tensor, cap, shift, temp, tanh) -> tuple[Tensor, Tensor]:
    """Softcapped float32 logits c and their slope dc / dz."""
    capped = softcap(z.float(), cap, shift, temp, tanh)
    if tanh:
        return capped, 1.0 - (capped / cap) ** 2
    s = capped / cap
    return capped, (cap / temp) * s * (1.0 - s)


def row_factors(logits, cap, shift, temp, tanh):
    """What the Triton kernel computes, by plain PyTorch ops in float32 (for the CPU and for
    tests): per row log S + cap, with S = sum(exp(c - cap)), then q = exp(c - cap) * dc and
    1 / S."""
    capped, slope = capped_and_slope(logits, cap, shift, temp, tanh)
    e = torch.exp(capped - cap)
    total = e.sum(-1)
    return torch.log(total) + cap, e * slope, 1.0 / total


def target_terms(logits, targets, weights, cap, shift, temp, tanh):
    """Softcapped logits and slopes at the (T, J) targets (a negative target is absent: its
    weight must be 0). With base = log S + cap, row i's loss is sum_j w_ij (base_i - c_ij) and
    d loss_i / d z = W_i q / S - sum_j w_ij dc_ij onehot(t_ij), W_i = sum_j w_ij."""
    picked = logits.gather(1, targets.clamp_min(0))
    return capped_and_slope(picked, cap, shift, temp, tanh)


def loss_and_factors(logits, targets, weights, cap, shift, temp, tanh):
    """The per-row loss and the gradient's factors q, 1 / S and the targets' slopes, by plain
    PyTorch ops (``row_factors`` and ``target_terms``)."""
    base, q, inv_sum = row_factors(logits, cap, shift, temp, tanh)
    capped, slope = target_terms(logits, targets, weights, cap, shift, temp, tanh)
    return (weights * (base[:, None] - capped)).sum(-1), q, inv_sum, slope


if triton is not None:

    @triton.jit
    def _capped(z, cap, shift, inv_temp, TANH: tl.constexpr):
        """Softcapped logits and their derivative with respect to z, in float32."""
        if TANH:
            t = 2.0 * tl.sigmoid(2.0 * z / cap) - 1.0  # tanh without libdevice
            return cap * t, 1.0 - t * t
        s = tl.sigmoid((z + shift) * inv_temp)
        return cap * s, cap * inv_temp * s * (1.0 - s)

    @triton.jit
    def _loss_grad_kernel(logits_ptr, base_ptr, inv_sum_ptr, q_ptr, rows, V, stride, q_stride,
                          cap, shift, inv_temp, q_scale, TANH: tl.constexpr,
                          WRITE_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """BLOCK_R rows in one pass over the vocabulary: their log S + cap and 1 / S, and (if
        WRITE_Q) q_scale * q. q_ptr may be logits_ptr: each tile is read before this program
        overwrites it."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        valid = r < rows
        r64 = r.to(tl.int64)
        cap = tl.cast(cap, tl.float32)  # inductor may pass float64 scalars
        shift = tl.cast(shift, tl.float32)
        inv_temp = tl.cast(inv_temp, tl.float32)
        scale = tl.cast(q_scale, tl.float32)
        total = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for start in range(0, V, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            inside = valid[:, None] & (cols[None, :] < V)
            z = tl.load(logits_ptr + r64[:, None] * stride + cols[None, :], mask=inside,
                        other=0.0).to(tl.float32)
            c, dc = _capped(z, cap, shift, inv_temp, TANH)
            e = tl.where(inside, tl.exp(c - cap), 0.0)
            total += tl.sum(e, axis=1)
            if WRITE_Q:
                q = (scale * e * dc).to(q_ptr.dtype.element_ty)
                tl.store(q_ptr + r64[:, None] * q_stride + cols[None, :], q, mask=inside)
        tl.store(base_ptr + r, tl.log(total) + cap, mask=valid)
        tl.store(inv_sum_ptr + r, 1.0 / total, mask=valid)

    @triton.jit
    def _transpose_kernel(src_ptr, dst_ptr, rows, cols, src_stride, dst_stride,
                          BLOCK: tl.constexpr):
        """One (BLOCK, BLOCK) tile of src, written transposed: both sides coalesced."""
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = (r[:, None] < rows) & (c[None, :] < cols)
        tile = tl.load(src_ptr + r[:, None].to(tl.int64) * src_stride + c[None, :], mask=inside)
        tl.store(dst_ptr + c[:, None].to(tl.int64) * dst_stride + r[None, :], tl.trans(tile),
                 mask=tl.trans(inside))


def transpose(x: Tensor) -> Tensor:
    """x.t().contiguous() for a row-major 2-D tensor. On CUDA a tiled Triton kernel: torch's
    generic strided copy is several times slower for float8 tensors (README, Speed)."""
    if not x.is_cuda or triton is None:
        return x.t().contiguous()
    return kernel_transpose(x)


def kernel_transpose(x: Tensor) -> Tensor:
    """The Triton kernel behind ``transpose`` (on any device under TRITON_INTERPRET=1)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"transpose takes a row-major 2-D tensor, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    rows, cols = x.shape
    out = x.new_empty(cols, rows)
    # float8 through uint8 views: the kernel only moves bytes
    src, dst = (x.view(torch.uint8), out.view(torch.uint8)) if x.element_size() == 1 else (x, out)
    grid = (triton.cdiv(rows, BLOCK_T), triton.cdiv(cols, BLOCK_T))
    _transpose_kernel[grid](src, dst, rows, cols, x.stride(0), out.stride(0), BLOCK=BLOCK_T)
    return out


def kernel_row_factors(logits, cap, shift, temp, tanh, q=None, q_scale=1.0):
    """The Triton kernel on (T, V) logits: returns the float32 log S + cap and 1 / S of each
    row, and when ``q`` (a (T, V) buffer, possibly ``logits`` itself) is given, fills it with
    q_scale * q."""
    rows, vocab = logits.shape
    base, inv_sum = (torch.empty(rows, device=logits.device, dtype=torch.float32)
                     for _ in range(2))  # separate: op outputs may not alias
    q_out = logits if q is None else q
    grid = (triton.cdiv(rows, BLOCK_ROWS),)
    _loss_grad_kernel[grid](
        logits, base, inv_sum, q_out, rows, vocab, logits.stride(0), q_out.stride(0), cap,
        shift, 1.0 / temp, q_scale, TANH=tanh, WRITE_Q=q is not None, BLOCK_R=BLOCK_ROWS,
        BLOCK_C=BLOCK_COLS, num_warps=LOSS_WARPS)
    return base, inv_sum


def use_fp8(hidden: Tensor, weight: Tensor, fp8: bool) -> bool:
    """float8 only on CUDA 8.9+ and with every matmul dimension a multiple of 16.
    (get_device_properties, unlike a cached helper, is constant-folded by torch.compile.)"""
    if not (fp8 and hidden.is_cuda and triton is not None):
        return False
    props = torch.cuda.get_device_properties(hidden.device)
    return ((props.major, props.minor) >= (8, 9)
            and all(n % 16 == 0 for n in (*hidden.shape, *weight.shape)))


def to_float8(x: Tensor, dtype=torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    """x / scale in float8 ``dtype``, scale = amax / the format's largest value (a float32
    device tensor: no host sync)."""
    scale = x.abs().amax().float().clamp_min(1e-12) / torch.finfo(dtype).max
    return (x / scale).to(dtype), scale


def _fp8_grad_scale(cap, temp, tanh) -> float:
    """The power of two that puts q's bound just under e5m2's largest value."""
    return 2.0 ** math.floor(math.log2(E5M2_MAX / grad_bound(cap, temp, tanh)))


@torch.library.custom_op("speedrun::linear_softcap_ce", mutates_args=())
def _linear_softcap_ce(hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor,
                       x8: Tensor, x_scale: Tensor, w8: Tensor, w_scale: Tensor, cap: float,
                       shift: float, temp: float, tanh: bool, with_grad: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss of softcap(hidden @ weight.T) at the (T, J) targets with their weights, summed
    over the targets of a row and averaged over the rows; and (when ``with_grad``) the factors
    of its gradient: q (scaled by ``_q_scale``), 1 / S and the targets' slopes. The matmul runs
    in float8 when the float8 operands x8 and w8 are given (not empty)."""
    def empty():  # outputs may not alias each other
        return hidden.new_empty(0)

    if not hidden.is_cuda or triton is None:
        loss, q, inv_sum, slope = loss_and_factors(hidden @ weight.t(), targets, weights, cap,
                                                   shift, temp, tanh)
        if not with_grad:
            return loss.mean(), empty(), empty(), empty()
        return loss.mean(), q.to(hidden.dtype), inv_sum, slope
    q = None
    if x8.numel():
        logits = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale,
                                  out_dtype=torch.bfloat16, use_fast_accum=True)
        if with_grad:
            q = torch.empty_like(logits, dtype=torch.float8_e5m2)
    else:
        logits = hidden @ weight.t()
        q = logits if with_grad else None  # q overwrites the logits
    # the targets' logits first: the kernel may write q over the logits
    capped, slope = target_terms(logits, targets, weights, cap, shift, temp, tanh)
    base, inv_sum = kernel_row_factors(logits, cap, shift, temp, tanh, q,
                                       q_scale=_q_scale(x8, cap, temp, tanh))
    loss = (weights * (base[:, None] - capped)).sum(-1).mean()
    if not with_grad:
        return loss, empty(), empty(), empty()
    return loss, q, inv_sum, slope


def _q_scale(x8, cap, temp, tanh) -> float:
    return _fp8_grad_scale(cap, temp, tanh) if x8.numel() else 1.0


@_linear_softcap_ce.register_fake
def _(hidden, weight, targets, weights, x8, x_scale, w8, w_scale, cap, shift, temp, tanh,
      with_grad):
    loss = hidden.new_empty(()).float()
    if not with_grad:
        return loss, *(hidden.new_empty(0) for _ in range(3))
    dtype = torch.float8_e5m2 if x8.numel() else hidden.dtype
    q = hidden.new_empty(hidden.size(0), weight.size(0), dtype=dtype)
    inv_sum = hidden.new_empty(hidden.size(0), dtype=torch.float32)
    return loss, q, inv_sum, weights.new_empty(weights.shape, dtype=torch.float32)


@torch.library.custom_op("speedrun::transposed", mutates_args=())
def _transposed(x: Tensor) -> Tensor:
    """``transpose`` as an op that torch.compile calls as it is (it cannot trace the Triton
    launch)."""
    return transpose(x)


@_transposed.register_fake
def _(x):
    return x.new_empty(x.shape[::-1])


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, weights, x8, x_scale, w8, w_scale, cap, shift, temp, tanh, _ = inputs
    _, q, inv_sum, slope = output
    ctx.save_for_backward(hidden, weight, targets, weights, q, inv_sum, slope, w8, w_scale)
    ctx.q_scale = _q_scale(x8, cap, temp, tanh)


def _backward(ctx, grad_loss, *_grads_of_factors):
    """d loss / d logits = row_scale * q - sum_j target_scale_j * onehot(targets_j): the
    matmuls with q, rows scaled on the side that is not summed over, then the one-hot parts as
    gathers and scatter-adds of T rows a target. Plain torch ops but for the transpose, so that
    inductor fuses the scaling and casts around the matmuls."""
    hidden, weight, targets, weights, q, inv_sum, slope, w8, w_scale = ctx.saved_tensors
    per_row = grad_loss.float() / hidden.size(0)  # the mean over rows
    row_scale = (inv_sum * weights.sum(-1) * (per_row / ctx.q_scale))[:, None]
    target_scale = slope * weights * per_row
    targets = targets.clamp_min(0)  # absent targets (weight 0) read row 0
    hidden32 = hidden.float()
    scaled_hidden = row_scale * hidden32
    if q.dtype == torch.float8_e5m2:
        h8, h_scale = to_float8(scaled_hidden)
        one = w_scale.new_ones(())
        # float8 matmuls take both operands K-major: weight and hidden transposed by the casts
        # that inductor fuses, the (T, V) q by the Triton kernel
        q_w = torch._scaled_mm(q, w8.t().contiguous().t(), scale_a=one, scale_b=w_scale,
                               out_dtype=torch.float32)
        q_h = torch._scaled_mm(_transposed(q), h8.t().contiguous().t(), scale_a=one,
                               scale_b=h_scale, out_dtype=torch.float32)
    else:
        q_w = (q @ weight.to(q.dtype)).float()
        q_h = (q.t() @ scaled_hidden.to(q.dtype)).float()
    grad_hidden, grad_weight = q_w * row_scale, q_h
    for j in range(targets.size(1)):
        scale = target_scale[:, j:j + 1]
        grad_hidden = grad_hidden - scale * weight[targets[:, j]]
        # atomic adds on CUDA, as in the embeddings' backward: fast, in no fixed order
        grad_weight = grad_weight.index_add(0, targets[:, j], -scale * hidden32)
    return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
            *(None for _ in range(11)))


_linear_softcap_ce.register_autograd(_backward, setup_context=_setup_context)


def linear_softcap_cross_entropy(hidden, weight, targets, cap, shift, temp, tanh, fp8=False,
                                 weights=None):
    """Softcapped cross-entropy of the logits hidden (T, D) @ weight (V, D).T, averaged over
    the rows. ``targets`` (T,), or (T, J) with ``weights`` (T, J): row i's loss is then
    sum_j weights_ij CE(row i, targets_ij), a negative target being absent (weight 0). The
    extra targets are those of multi-token and prefix-token prediction.

    One op: the Triton kernel on CUDA, ``loss_and_factors`` elsewhere. Computes the logits'
    gradient in the forward pass only when autograd will need it. The float8 operands are cast
    here, outside the op, so that inductor fuses their casts."""
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    if targets.dim() == 1:
        targets = targets[:, None]
        weights = torch.ones(targets.shape, device=targets.device)
    if use_fp8(hidden, weight, fp8):
        (x8, x_scale), (w8, w_scale) = to_float8(hidden), to_float8(weight)
    else:
        x8, x_scale, w8, w_scale = (hidden.new_empty(0) for _ in range(4))
    return _linear_softcap_ce(hidden, weight, targets.contiguous(), weights.float().contiguous(),
                              x8, x_scale, w8, w_scale, float(cap), float(shift), float(temp),
                              bool(tanh), with_grad)[0]


class _Float8Linear(torch.autograd.Function):
    """x @ weight.T for a 2-D x, its three matmuls in float8. Saves the float8 x and weight
    for the backward pass: half the bytes of a bf16 x."""

    @staticmethod
    def forward(ctx, x, weight):
        (x8, x_scale), (w8, w_scale) = to_float8(x), to_float8(weight)
        ctx.save_for_backward(x8, x_scale, w8, w_scale)
        ctx.weight_dtype = weight.dtype
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale,
                                out_dtype=x.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad):
        x8, x_scale, w8, w_scale = ctx.saved_tensors
        g8, g_scale = to_float8(grad, torch.float8_e5m2)
        # float8 matmuls take their second operand column-major: both operands K-major. Plain
        # .t().contiguous() rather than ``transpose``: under compile inductor fuses these
        # copies with the casts, where the Triton transpose would be an extra opaque pass
        grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=g_scale,
                                  scale_b=w_scale, out_dtype=grad.dtype)
        grad_w = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(),
                                  scale_a=g_scale, scale_b=x_scale, out_dtype=ctx.weight_dtype)
        return grad_x, grad_w


def float8_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T through ``_Float8Linear`` on any device (torch._scaled_mm runs on the CPU
    too, which is how the tests check it)."""
    rows = x.reshape(-1, x.size(-1))
    return _Float8Linear.apply(rows, weight).view(*x.shape[:-1], weight.size(0))


def linear(x: Tensor, weight: Tensor, fp8: bool = False) -> Tensor:
    """x @ weight.T in x's dtype, or in float8 where ``use_fp8`` allows (the weight is then
    quantized from its own dtype, and its gradient comes back in that dtype)."""
    if use_fp8(x.reshape(-1, x.size(-1)), weight, fp8):
        return float8_linear(x, weight)
    return F.linear(x, weight.type_as(x))


# Record #92's delayed scaling: by float8 format, the headroom over the previous step's amax, the
# smallest scale, and the scale before any amax is known (the record's for the MLP's hidden
# activation, e4m3, and its gradient, e5m2)
DELAYED_SCALING = {torch.float8_e4m3fn: (1.03, 1e-6, 1.0),
                   torch.float8_e5m2: (1.25, 1e-12, 2.0 ** -6)}
RELU2_CAST_TILE, RELU2_CAST_WARPS = (64, 128), 8  # (rows, columns) a program


def refresh_scale_(scale: Tensor, amax: Tensor, dtype):
    """The next step's delayed scale: headroom x amax / the format's largest value, at least the
    smallest scale; the previous scale kept where amax is zero (no gradient yet: the zero
    initialised down projection's first step) or not finite (a diverged step). amax restarts
    at zero."""
    headroom, smallest, _ = DELAYED_SCALING[dtype]
    # the record's cap on amax, 1e12, before the headroom
    fresh = (amax.clamp(max=1e12) * (headroom / torch.finfo(dtype).max)).clamp_min(smallest)
    scale.copy_(torch.where(amax.isfinite() & (amax > 0), fresh, scale))
    amax.zero_()


if triton is not None:

    @triton.jit
    def _relu2_cast_kernel(pre_ptr, grad_ptr, q_ptr, amax_ptr, scale_ptr, M, N,
                           GRAD: tl.constexpr, TOP: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
        """One (BLOCK_M, BLOCK_N) tile: value = relu(pre)^2, or 2 grad relu(pre) with GRAD,
        in float32; value / scale saturated at +-TOP in q's float8 format, to q; the tile's
        largest |value| to amax_ptr[program]."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = (r[:, None] < M) & (c[None, :] < N)
        offsets = r[:, None].to(tl.int64) * N + c[None, :]
        relu = tl.maximum(tl.load(pre_ptr + offsets, mask=inside, other=0.0).to(tl.float32), 0.0)
        if GRAD:
            grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            value = 2.0 * grad * relu
        else:
            value = relu * relu
        tl.store(amax_ptr + pid_m * tl.num_programs(1) + pid_n,
                 tl.max(tl.max(tl.abs(value), axis=1), axis=0))
        inverse = 1.0 / tl.load(scale_ptr)
        q = tl.minimum(tl.maximum(value * inverse, -TOP), TOP).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + offsets, q, mask=inside)


def relu2_cast_reference(pre: Tensor, grad: Tensor, scale: Tensor, dtype
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """What ``relu2_cast`` computes, by PyTorch ops: value = relu(pre)^2, or with a gradient
    (not empty) at relu^2's output 2 grad relu(pre), its gradient at pre, in float32; value /
    scale in float8 ``dtype``, saturated at the format's largest value; that copy transposed;
    the largest |value|."""
    relu = F.relu(pre.float())
    value = 2.0 * grad.float() * relu if grad.numel() else relu * relu
    top = torch.finfo(dtype).max
    q = (value * (1.0 / scale)).clamp(-top, top).to(dtype)
    return q, q.t().contiguous(), value.abs().amax()


def kernel_relu2_cast(pre: Tensor, grad: Tensor, scale: Tensor, dtype
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton kernel behind ``relu2_cast`` (on any device under TRITON_INTERPRET=1), then
    the transposed copy by ``kernel_transpose``."""
    (M, N), (bm, bn) = pre.shape, RELU2_CAST_TILE
    q = pre.new_empty(M, N, dtype=dtype)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    amax = pre.new_empty(grid[0] * grid[1], dtype=torch.float32)  # a tile's largest |value|
    _relu2_cast_kernel[grid](pre, grad if grad.numel() else pre, q, amax, scale, M, N,
                             GRAD=grad.numel() > 0, TOP=torch.finfo(dtype).max, BLOCK_M=bm,
                             BLOCK_N=bn, num_warps=RELU2_CAST_WARPS)
    # Not a second, transposed store of q in the same kernel: Triton miscompiles that pattern
    # (triton-lang/triton#11111); on an H100 it left garbage bytes in the e5m2 copy, NaN weight
    # gradients. The transpose kernel alone is the one the loss's float8 gradient uses
    return q, kernel_transpose(q), amax.amax()


@torch.library.custom_op("speedrun::relu2_cast", mutates_args=())
def _relu2_cast(pre: Tensor, grad: Tensor, scale: Tensor, e5m2: bool
                ) -> tuple[Tensor, Tensor, Tensor]:
    """``relu2_cast_reference``'s outputs in e4m3 (or e5m2): the Triton kernel on CUDA, the
    reference elsewhere."""
    dtype = torch.float8_e5m2 if e5m2 else torch.float8_e4m3fn
    if not pre.is_cuda or triton is None:
        return relu2_cast_reference(pre, grad, scale, dtype)
    return kernel_relu2_cast(pre.contiguous(), grad.contiguous(), scale, dtype)


@_relu2_cast.register_fake
def _(pre, grad, scale, e5m2):
    dtype = torch.float8_e5m2 if e5m2 else torch.float8_e4m3fn
    return (pre.new_empty(pre.shape, dtype=dtype), pre.new_empty(pre.shape[::-1], dtype=dtype),
            scale.new_empty(()))


class _Float8Relu2MLP(torch.autograd.Function):
    """relu(x @ fc.T)^2 @ proj.T for a 2-D x, its six matmuls in float8 (as ``linear``'s, with
    dynamic scales for x, the weights and the output's gradient) but for the hidden activation
    post and its gradient at pre, cast at the delayed scales given by ``relu2_cast`` in one
    pass each; their amax buffers take the running largest |value|."""

    @staticmethod
    def forward(ctx, x, fc, proj, post_scale, post_amax, grad_scale, grad_amax):
        (x8, x_scale), (fc8, fc_scale), (proj8, proj_scale) = map(to_float8, (x, fc, proj))
        pre = torch._scaled_mm(x8, fc8.t(), scale_a=x_scale, scale_b=fc_scale,
                               out_dtype=x.dtype, use_fast_accum=True)
        post8, post8_t, amax = _relu2_cast(pre, pre.new_empty(0), post_scale, False)
        post_amax.copy_(torch.maximum(post_amax, amax))
        ctx.save_for_backward(x8, x_scale, fc8, fc_scale, proj8, proj_scale, pre, post8_t,
                              post_scale, grad_scale, grad_amax)
        ctx.weight_dtype = fc.dtype
        return torch._scaled_mm(post8, proj8.t(), scale_a=post_scale, scale_b=proj_scale,
                                out_dtype=x.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad):
        (x8, x_scale, fc8, fc_scale, proj8, proj_scale, pre, post8_t, post_scale, grad_scale,
         grad_amax) = ctx.saved_tensors
        g8, g_scale = to_float8(grad.contiguous(), torch.float8_e5m2)
        # both operands K-major: the small ones transposed by inductor's copies, the hidden
        # ones by ``relu2_cast``
        grad_proj = torch._scaled_mm(g8.t().contiguous(), post8_t.t(), scale_a=g_scale,
                                     scale_b=post_scale, out_dtype=ctx.weight_dtype)
        grad_post = torch._scaled_mm(g8, proj8.t().contiguous().t(), scale_a=g_scale,
                                     scale_b=proj_scale, out_dtype=grad.dtype)
        dpre8, dpre8_t, amax = _relu2_cast(pre, grad_post, grad_scale, True)
        grad_amax.copy_(torch.maximum(grad_amax, amax))
        grad_x = torch._scaled_mm(dpre8, fc8.t().contiguous().t(), scale_a=grad_scale,
                                  scale_b=fc_scale, out_dtype=grad.dtype)
        grad_fc = torch._scaled_mm(dpre8_t, x8.t().contiguous().t(), scale_a=grad_scale,
                                   scale_b=x_scale, out_dtype=ctx.weight_dtype)
        return grad_x, grad_fc, grad_proj, None, None, None, None


def float8_relu2_mlp(x: Tensor, fc: Tensor, proj: Tensor, post: tuple, grad: tuple) -> Tensor:
    """relu(x @ fc.T)^2 @ proj.T for x (..., D) through ``_Float8Relu2MLP`` on any device
    (torch._scaled_mm runs on the CPU too); ``post`` and ``grad``: the (scale, amax) float32
    scalar buffers of the hidden activation's and its gradient's delayed scales (moved on by
    ``refresh_scale_``)."""
    rows = x.reshape(-1, x.size(-1))
    out = _Float8Relu2MLP.apply(rows, fc, proj, *post, *grad)
    return out.view(*x.shape[:-1], proj.size(0))


# Record #89's MLP (#306, #342): relu(x @ fc.T)^2 @ proj.T with both forward matmuls in float8,
# relu^2 and the float8 cast of its output in the up projection's epilogue (its scale the
# previous call's amax with headroom, so no pass over the hidden activation to find it), and the
# backward in bf16 from the saved post = relu(pre)^2 alone (relu(pre) = sqrt(post)): no
# transposed float8 copies, no amax passes, no pre in memory.
E4M3_MAX = 448.0
MLP_ACT_HEADROOM = 1.8  # the record's: the next call's activation scale is 1.8 amax / 448
# the record's tile: (BLOCK_M, BLOCK_N), its epilogue in two halves of BLOCK_N / 2 columns to
# keep registers down; 8 warps; pipeline stages (forward, backward)
MLP_TILE, MLP_WARPS, MLP_STAGES = (128, 256), 8, (3, 3)

if triton is not None:

    @triton.jit
    def _relu2_epilogue(acc, row, col, out_desc, post_desc, out8_desc, amax, scale,
                        inverse_act_scale, FORWARD: tl.constexpr):
        """One half tile: see ``_relu2_matmul_kernel``. Returns the running amax."""
        if FORWARD:
            pre = (acc * scale).to(tl.bfloat16)
            relu = tl.maximum(pre, 0.0)
            post = relu * relu
            out_desc.store([row, col], post)
            post32 = post.to(tl.float32)
            out8_desc.store([row, col],
                            tl.minimum(post32 * inverse_act_scale, 448.0).to(tl.float8e4nv))
            amax = tl.maximum(amax, tl.max(tl.max(post32, axis=1), axis=0))
        else:
            post = post_desc.load([row, col]).to(tl.float32)
            grad = acc.to(tl.bfloat16).to(tl.float32)
            out_desc.store([row, col], (2.0 * grad * tl.sqrt(post)).to(tl.bfloat16))
        return amax

    @triton.jit
    def _relu2_matmul_kernel(a_desc, b_desc, out_desc, post_desc, out8_desc, amax_ptr,
                             scale_ptr, act_scale_ptr, M, N, K, FORWARD: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        """One (BLOCK_M, BLOCK_N) tile of acc = a @ b.T (b as (N, K), the forward) or a @ b
        (b as (K, N), the backward), then the epilogue. Forward: pre = bf16(acc * scale), post
        = bf16(relu(pre)^2) to out, min(post / act_scale, 448) in e4m3 to out8, and the tile's
        largest post to amax_ptr[program]. Backward: 2 bf16(acc) sqrt(post) to out. Tiles go
        a column of 8 row tiles at a time, so that b's tile is reused from L2."""
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = 8 * tiles_n
        first_m = (pid // group) * 8
        group_m = min(tiles_m - first_m, 8)
        row = (first_m + (pid % group) % group_m) * BLOCK_M
        col = ((pid % group) // group_m) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = a_desc.load([row, k])
            if FORWARD:
                acc = tl.dot(a, b_desc.load([col, k]).T, acc)
            else:
                acc = tl.dot(a, b_desc.load([k, col]), acc)
        scale, inverse_act_scale = 1.0, 1.0
        if FORWARD:
            scale = tl.load(scale_ptr)
            inverse_act_scale = 1.0 / tl.load(act_scale_ptr)
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)),
                                          (0, 2, 1)))
        amax = _relu2_epilogue(left, row, col, out_desc, post_desc, out8_desc, 0.0, scale,
                               inverse_act_scale, FORWARD)
        amax = _relu2_epilogue(right, row, col + BLOCK_N // 2, out_desc, post_desc, out8_desc,
                               amax, scale, inverse_act_scale, FORWARD)
        if FORWARD:
            tl.store(amax_ptr + pid, amax)


def relu2_up_reference(x8, fc8, scale, act_scale):
    """What the forward kernel computes, by PyTorch ops: post = bf16(relu(bf16(x8 @ fc8.T *
    scale))^2), its e4m3 copy min(post / act_scale, 448) and the largest post."""
    pre = (x8.float() @ fc8.float().t() * scale).to(torch.bfloat16)
    post = F.relu(pre).square()
    post8 = (post.float() / act_scale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    return post, post8, post.float().amax()


def relu2_grad_reference(grad, proj, post):
    """What the backward kernel computes: d loss / d pre = 2 bf16(grad @ proj) sqrt(post)."""
    product = (grad.float() @ proj.float()).to(torch.bfloat16).float()
    return (2.0 * product * post.float().sqrt()).to(torch.bfloat16)


def _launch_relu2(a, b, out, post, out8, amax, scale, act_scale, forward: bool):
    """The kernel for out (M, N) from a (M, K) and b: (N, K) forward, (K, N) backward. The
    arguments the mode does not read may be any tensor a descriptor takes."""
    (M, K), N = a.shape, out.size(1)
    (bm, bn), bk = MLP_TILE, 128 if a.element_size() == 1 else 64

    def descriptor(x, block):
        return TensorDescriptor.from_tensor(x, list(block))

    halves = (bm, bn // 2)
    _relu2_matmul_kernel[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](
        descriptor(a, (bm, bk)), descriptor(b, (bn, bk) if forward else (bk, bn)),
        descriptor(out, halves), descriptor(post, halves), descriptor(out8, halves), amax, scale,
        act_scale, M, N, K, FORWARD=forward, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=MLP_WARPS, num_stages=MLP_STAGES[0 if forward else 1])


@torch.library.custom_op("speedrun::relu2_up", mutates_args=())
def _relu2_up(x8: Tensor, fc8: Tensor, scale: Tensor, act_scale: Tensor
              ) -> tuple[Tensor, Tensor, Tensor]:
    """post = relu(x8 @ fc8.T * scale)^2 in bf16, its e4m3 copy (post / act_scale, capped at
    448) and the largest post: the Triton kernel on CUDA, ``relu2_up_reference`` elsewhere."""
    if not x8.is_cuda or triton is None:
        return relu2_up_reference(x8, fc8, scale, act_scale)
    M, N = x8.size(0), fc8.size(0)
    post = x8.new_empty(M, N, dtype=torch.bfloat16)
    post8 = torch.empty_like(post, dtype=torch.float8_e4m3fn)
    amax = x8.new_empty(triton.cdiv(M, MLP_TILE[0]) * triton.cdiv(N, MLP_TILE[1]),
                        dtype=torch.float32)  # a tile's largest post each
    _launch_relu2(x8, fc8, post, post, post8, amax, scale, act_scale, forward=True)
    return post, post8, amax.amax()


@_relu2_up.register_fake
def _(x8, fc8, scale, act_scale):
    post = x8.new_empty(x8.size(0), fc8.size(0), dtype=torch.bfloat16)
    return post, torch.empty_like(post, dtype=torch.float8_e4m3fn), scale.new_empty(())


@torch.library.custom_op("speedrun::relu2_grad", mutates_args=())
def _relu2_grad(grad: Tensor, proj: Tensor, post: Tensor) -> Tensor:
    """2 bf16(grad @ proj) sqrt(post): the Triton kernel on CUDA, ``relu2_grad_reference``
    elsewhere."""
    if not grad.is_cuda or triton is None:
        return relu2_grad_reference(grad, proj, post)
    out = torch.empty_like(post)
    unused = grad.new_empty(1, dtype=torch.float32)
    _launch_relu2(grad, proj, out, post, post, unused, unused, unused, forward=False)
    return out


@_relu2_grad.register_fake
def _(grad, proj, post):
    return torch.empty_like(post)


class _Relu2MLP(torch.autograd.Function):
    """relu(x @ fc.T)^2 @ proj.T for a 2-D bf16 x: the forward's two matmuls in float8 (x, fc
    and proj with dynamic per-tensor scales, the hidden activation with ``act_scale``), the
    backward's four in bf16 from x and post. Returns the output and post's largest value."""

    @staticmethod
    def forward(ctx, x, fc, proj, act_scale):
        (x8, x_scale), (fc8, fc_scale), (proj8, proj_scale) = map(to_float8, (x, fc, proj))
        post, post8, amax = _relu2_up(x8, fc8, x_scale * fc_scale, act_scale)
        out = torch._scaled_mm(post8, proj8.t(), scale_a=act_scale, scale_b=proj_scale,
                               out_dtype=x.dtype, use_fast_accum=True)
        ctx.save_for_backward(x, fc, proj, post)
        ctx.mark_non_differentiable(amax)
        return out, amax

    @staticmethod
    def backward(ctx, grad, _):
        x, fc, proj, post = ctx.saved_tensors
        grad = grad.contiguous()
        grad_proj = grad.t() @ post
        grad_pre = _relu2_grad(grad, proj.to(grad.dtype), post)
        grad_fc = grad_pre.t() @ x
        grad_x = grad_pre @ fc.to(x.dtype)
        return grad_x, grad_fc.to(fc.dtype), grad_proj.to(proj.dtype), None


def use_relu2_mlp(x: Tensor, fc: Tensor, proj: Tensor) -> bool:
    """The fused MLP where float8 is (``use_fp8``) and x is bf16, as its kernels take it."""
    rows = x.reshape(-1, x.size(-1))
    return x.dtype == torch.bfloat16 and use_fp8(rows, fc, True) and use_fp8(rows, proj, True)


def relu2_mlp(x: Tensor, fc: Tensor, proj: Tensor, act_scale: Tensor) -> tuple[Tensor, Tensor]:
    """Record #89's MLP on x (..., D) in bf16: relu(x @ fc.T)^2 @ proj.T, and the next call's
    activation scale (MLP_ACT_HEADROOM times this call's largest hidden activation / 448).
    ``act_scale`` is this call's: a float32 scalar tensor."""
    rows = x.reshape(-1, x.size(-1))
    out, amax = _Relu2MLP.apply(rows, fc, proj, act_scale)
    next_scale = amax.clamp_min(1e-12) * (MLP_ACT_HEADROOM / E4M3_MAX)
    return out.view(*x.shape[:-1], proj.size(0)), next_scale
