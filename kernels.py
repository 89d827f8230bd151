"""Fused and float8 ops, each with the plain PyTorch it must equal: the lm_head and its
softcapped cross-entropy as one op, and a float8 linear layer for the MLP.

The speedrun's loss takes (T, V) logits = hidden @ W.T, softcaps them and takes the
cross-entropy in float32. Left to autograd that keeps the logits for the backward pass and then
allocates their gradient beside them: two (T, V) buffers, 13 GB at T = 64K. Here the forward
pass also computes the logits' gradient (a mean loss has no other consumer) and writes it over
the logits, so a single (T, V) buffer lives until the backward pass, which is then just the two
matmuls. The softcap bounds the logits to [0, cap] (sigmoid form) or [-cap, cap] (tanh form),
so the log-sum-exp needs no running max: exp(c - cap) cannot overflow.

With ``fp8`` on a GPU of compute capability 8.9 or later the three matmuls run in float8
(torch._scaled_mm): hidden and W in e4m3 with one dynamic scale each, the logits' gradient in
e5m2, written by the kernel straight from float32 with a fixed power-of-two scale that its
analytic bound allows. Elsewhere ``fp8`` is ignored and the matmuls run in the inputs' dtype.

``linear(x, weight, fp8=True)`` runs x @ weight.T and both of its backward matmuls in float8
with one dynamic scale per tensor (e4m3 for x and the weight, e5m2 for the output's gradient).
It is plain torch ops under torch.compile, so inductor fuses the scaling, casts and the
transposes that the weight gradient's float8 layout needs into the neighbouring kernels.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton (macOS, some CPU-only installs): the PyTorch path is used
    triton = None

BLOCK_V = 1024  # vocabulary columns per inner iteration
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
    """Largest |d loss_row / d z|: |softmax - onehot| <= 1 times the softcap's slope."""
    return 1.0 if tanh else cap / (4.0 * temp)


def loss_and_grad(logits, targets, cap, shift, temp, tanh):
    """Per-row loss and d loss_row / d logits, in float32, by plain PyTorch ops: what the
    Triton kernel computes, for the CPU and for tests."""
    z = logits.float()
    capped = softcap(z, cap, shift, temp, tanh)
    if tanh:
        slope = 1.0 - (capped / cap) ** 2
    else:
        s = capped / cap
        slope = (cap / temp) * s * (1.0 - s)
    log_probs = torch.log_softmax(capped, dim=-1)
    rows = torch.arange(len(targets), device=logits.device)
    grad = log_probs.exp()
    grad[rows, targets] -= 1.0
    return -log_probs[rows, targets], grad * slope


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
    def _loss_grad_kernel(logits_ptr, targets_ptr, loss_ptr, grad_ptr, V, stride, grad_stride,
                          cap, shift, inv_temp, grad_scale, TANH: tl.constexpr,
                          WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        """One row: the loss, then (if WRITE_GRAD) grad_scale * d loss / d z. grad_ptr may be
        logits_ptr: each element is read before this program overwrites it."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        cap = tl.cast(cap, tl.float32)  # inductor may pass float64 scalars
        shift = tl.cast(shift, tl.float32)
        inv_temp = tl.cast(inv_temp, tl.float32)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < V
            z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            c, _ = _capped(z, cap, shift, inv_temp, TANH)
            total += tl.where(inside, tl.exp(c - cap), 0.0)
        lse = cap + tl.log(tl.sum(total, axis=0))
        target = tl.load(targets_ptr + row)
        c_target, _ = _capped(tl.load(base + target).to(tl.float32), cap, shift, inv_temp, TANH)
        tl.store(loss_ptr + row, lse - c_target)
        if WRITE_GRAD:
            out = grad_ptr + row * grad_stride
            scale = tl.cast(grad_scale, tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                inside = cols < V
                z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
                c, dc = _capped(z, cap, shift, inv_temp, TANH)
                p = tl.exp(c - lse) - tl.where(cols == target, 1.0, 0.0)
                tl.store(out + cols, (scale * p * dc).to(out.dtype.element_ty), mask=inside)

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
    generic strided copy took ~20 ms for the 3.3 GB float8 gradient (H100 profile)."""
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


def kernel_loss_and_grad(logits, targets, cap, shift, temp, tanh, grad=None, grad_scale=1.0):
    """The Triton kernel on (T, V) logits: returns the float32 per-row loss and, when ``grad``
    (a (T, V) buffer, possibly ``logits`` itself) is given, fills it with grad_scale times
    d loss_row / d logits."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    out = logits if grad is None else grad
    _loss_grad_kernel[(rows,)](
        logits, targets, loss, out, vocab, logits.stride(0), out.stride(0), cap, shift,
        1.0 / temp, grad_scale, TANH=tanh, WRITE_GRAD=grad is not None, BLOCK=BLOCK_V)
    return loss


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


def _column_major(x: Tensor) -> Tensor:
    return transpose(x).t()


def _fp8_grad_scale(cap, temp, tanh) -> float:
    """The power of two that puts the gradient's bound just under e5m2's largest value."""
    return 2.0 ** math.floor(math.log2(E5M2_MAX / grad_bound(cap, temp, tanh)))


@torch.library.custom_op("speedrun::linear_softcap_ce", mutates_args=())
def _linear_softcap_ce(hidden: Tensor, weight: Tensor, targets: Tensor, cap: float,
                       shift: float, temp: float, tanh: bool, fp8: bool,
                       with_grad: bool) -> tuple[Tensor, Tensor]:
    """Mean loss of softcap(hidden @ weight.T), and (when ``with_grad``) the stored gradient
    of the per-row losses with respect to the logits (scaled, see ``_stored_grad_scale``)."""
    empty = hidden.new_empty(0)
    if not hidden.is_cuda or triton is None:
        loss, grad = loss_and_grad(hidden @ weight.t(), targets, cap, shift, temp, tanh)
        return loss.mean(), grad.to(hidden.dtype) if with_grad else empty
    if use_fp8(hidden, weight, fp8):
        (x8, x_scale), (w8, w_scale) = to_float8(hidden), to_float8(weight)
        logits = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale,
                                  out_dtype=torch.bfloat16, use_fast_accum=True)
        grad = torch.empty_like(logits, dtype=torch.float8_e5m2) if with_grad else None
    else:
        logits = hidden @ weight.t()
        grad = logits if with_grad else None  # the gradient overwrites the logits
    loss = kernel_loss_and_grad(logits, targets, cap, shift, temp, tanh, grad,
                                _stored_grad_scale(hidden, weight, fp8, cap, temp, tanh))
    return loss.mean(), empty if grad is None else grad


def _stored_grad_scale(hidden, weight, fp8, cap, temp, tanh) -> float:
    return _fp8_grad_scale(cap, temp, tanh) if use_fp8(hidden, weight, fp8) else 1.0


@_linear_softcap_ce.register_fake
def _(hidden, weight, targets, cap, shift, temp, tanh, fp8, with_grad):
    rows, vocab = hidden.size(0), weight.size(0)
    if not with_grad:
        return hidden.new_empty(()).float(), hidden.new_empty(0)
    dtype = torch.float8_e5m2 if use_fp8(hidden, weight, fp8) else hidden.dtype
    return hidden.new_empty(()).float(), hidden.new_empty(rows, vocab, dtype=dtype)


@torch.library.custom_op("speedrun::linear_softcap_ce_backward", mutates_args=())
def _linear_softcap_ce_backward(grad: Tensor, hidden: Tensor, weight: Tensor,
                                scale: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_hidden, grad_weight) = scale * (grad @ weight, grad.T @ hidden), where ``scale``
    (a one-element float32 tensor) undoes the stored scale and applies the mean and the
    incoming gradient. A float8 ``grad`` runs both matmuls in float8."""
    if grad.dtype != torch.float8_e5m2:
        # scale stays float32 (a 1-element tensor promotes): a bf16 scale would be off by up to
        # 0.4% for the whole gradient
        return (grad @ weight).mul_(scale), (grad.t() @ hidden).mul_(scale)
    (x8, x_scale), (w8, w_scale) = to_float8(hidden), to_float8(weight)
    grad_hidden = torch._scaled_mm(grad, _column_major(w8), scale_a=scale, scale_b=w_scale,
                                   out_dtype=hidden.dtype)
    grad_weight = torch._scaled_mm(transpose(grad), _column_major(x8), scale_a=scale,
                                   scale_b=x_scale, out_dtype=weight.dtype)
    return grad_hidden, grad_weight


@_linear_softcap_ce_backward.register_fake
def _(grad, hidden, weight, scale):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, cap, shift, temp, tanh, fp8, with_grad = inputs
    ctx.save_for_backward(hidden, weight, output[1])
    ctx.stored_scale = _stored_grad_scale(hidden, weight, fp8, cap, temp, tanh)


def _backward(ctx, grad_loss, _grad_of_grad):
    hidden, weight, grad = ctx.saved_tensors
    scale = (grad_loss.float() / (hidden.size(0) * ctx.stored_scale)).reshape(1)
    grad_hidden, grad_weight = _linear_softcap_ce_backward(grad, hidden, weight, scale)
    return grad_hidden, grad_weight, None, None, None, None, None, None, None


_linear_softcap_ce.register_autograd(_backward, setup_context=_setup_context)


def linear_softcap_cross_entropy(hidden, weight, targets, cap, shift, temp, tanh, fp8=False):
    """Mean softcapped cross-entropy of the logits hidden (T, D) @ weight (V, D).T.

    One op: the Triton kernel on CUDA, ``loss_and_grad`` elsewhere. Computes the logits'
    gradient in the forward pass only when autograd will need it."""
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, _ = _linear_softcap_ce(hidden.contiguous(), weight.contiguous(), targets.contiguous(),
                                 float(cap), float(shift), float(temp), bool(tanh), bool(fp8),
                                 with_grad)
    return loss


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
        # .t().contiguous() rather than ``_column_major``: under compile inductor fuses these
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
