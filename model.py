"""The speedrun GPT: a GPT-2-small-class transformer with the tricks of the NanoGPT speedrun.

Read top to bottom: config, small helpers, rotary embedding with YaRN, attention masks,
attention, MLP, block, and the GPT itself. Every trick is switchable or sized from
``model_config`` (see config/base.py, which sets the strong defaults, and the README's table).

Shapes: the model takes one packed sequence of T token ids (T a multiple of the 128-token
attention block). Documents start with BOS (50256) and attend only within themselves.
On CUDA attention runs through FlexAttention with block-sparse masks; on the CPU (where
FlexAttention has no backward pass) through scaled_dot_product_attention with the equivalent
dense mask. Both obey the same rule, see ``dense_attention_mask``. On CUDA the residual stream
and activations are bf16 (``GPT.compute_dtype``), on the CPU float32.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import kernels

BOS_ID = 50256
GATE_CHANNELS = 12  # gates read the first few channels of their input: cheap and enough


@dataclass(frozen=True)
class GPTConfig:
    """Every key of ``model_config``; all are required so config/base.py is the one source."""

    vocab_size: int  # 50257 for GPT-2 BPE
    vocab_multiple: int  # pad the vocabulary to a multiple of this (128: 50257 -> 50304)
    num_layers: int
    model_dim: int
    num_heads: int
    head_dim: int
    ffn_dim: int  # MLP hidden width (per branch for the gated activations)
    activation: str  # relu2 | gelu | silu | swiglu | geglu
    block_size: int  # FlexAttention block; windows are counted in these blocks
    window_pattern: str  # one letter a layer: L long window, S short window, - no attention
    attn_scale: float  # attention logit scale (with QK norm, ~0.1)
    rope_base: float  # slowest rotary frequency is 1/rope_base turns per token
    rope_fraction: float  # share of each head's dims that rotate (the rest carry no position)
    yarn_alpha: float  # YaRN: dims turning fewer times than alpha over the old window stretch
    yarn_beta: float  # YaRN: dims turning more times than beta keep their frequency
    yarn_attn_factor: float  # YaRN: attention scale *= 1 + factor * ln(new / old)
    value_embed_layers: tuple  # one tuple of layer indices per value-embedding table
    attn_gate: bool  # per-head sigmoid gate on the attention output
    smear_gate: bool  # x_t += lambda * sigmoid(w . x_t[:12]) * x_{t-1} on the embedding
    skip_connections: tuple  # (source layer, target layer) pairs of gated skips
    backout_layer: int | None  # subtract lambda * (state after this layer) before the head
    residual_init: float  # per-layer residual multiplier, learnable
    x0_init: float  # per-layer multiplier of the embedding x0 added back, learnable
    skip_lambda_init: float  # skip strength is sigmoid(lambda) * 2 sigmoid(gate)
    backout_init: float
    logit_softcap: float
    softcap_form: str  # sigmoid: cap * sigmoid((z + shift) / temp); tanh: cap * tanh(z / cap)
    softcap_shift: float
    softcap_temp: float
    fused_loss: bool  # lm_head + softcap + cross-entropy as one op, gradient in forward
    fp8_lm_head: bool  # that op's matmuls in float8 on CUDA capability >= 8.9 (kernels.py)
    fp8_mlp: bool  # the MLP's matmuls in float8 there too (kernels.linear)
    init_std: float  # matrices: uniform with std init_std / sqrt(fan_in)
    lm_head_init_std: float  # the (tied) head/embedding: normal with this std

    @classmethod
    def from_dict(cls, model_config):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(model_config) - names)
        missing = sorted(names - set(model_config))
        if unknown or missing:
            raise ValueError(f"model_config: unknown keys {unknown}, missing keys {missing}")
        config = cls(**{k: _frozen(v) for k, v in model_config.items()})
        config.validate()
        return config

    def validate(self):
        problems = []
        pattern_ok = (len(self.window_pattern) == self.num_layers
                      and not set(self.window_pattern) - set("LS-"))
        if not pattern_ok:
            problems.append(f"window_pattern {self.window_pattern!r} needs one of L, S, - for "
                            f"each of the {self.num_layers} layers")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} not in {sorted(ACTIVATIONS)}")
        if self.softcap_form not in ("sigmoid", "tanh"):
            problems.append(f"softcap_form {self.softcap_form!r} must be sigmoid or tanh")
        if self.head_dim % 4:
            problems.append("head_dim must be a multiple of 4 (rotary pairs)")
        layers = [i for table in self.value_embed_layers for i in table]
        if len(layers) != len(set(layers)) or any(not 0 <= i < self.num_layers for i in layers):
            problems.append(f"value_embed_layers {self.value_embed_layers} must name distinct "
                            f"layers in [0, {self.num_layers})")
        for i in layers:
            if pattern_ok and 0 <= i < self.num_layers and self.window_pattern[i] == "-":
                problems.append(f"value embedding on layer {i}, which has no attention")
        for src, dst in self.skip_connections:
            if not 0 <= src < dst < self.num_layers:
                problems.append(f"skip ({src}, {dst}) must go forward between layers")
        if self.backout_layer is not None and not 0 <= self.backout_layer < self.num_layers:
            problems.append(f"backout_layer {self.backout_layer} out of range")
        if problems:
            raise ValueError("model_config: " + "; ".join(problems))

    @property
    def padded_vocab(self):
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


def _frozen(value):
    """Lists from a config or an override become tuples, so the config stays hashable."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


NORM_EPS = torch.finfo(torch.float32).eps


def norm(x: Tensor) -> Tensor:
    """RMSNorm without a learnable weight. The eps is float32's at every dtype: by default a
    bf16 input would get bf16's (2**-7), a different function from the float32 path's."""
    return F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)


def make_param(tensor, label, lr_mul=1.0, wd_mul=1.0):
    """A parameter that tells optimizers.py its group (label) and its lr/wd multipliers."""
    param = nn.Parameter(tensor)
    param.label, param.lr_mul, param.wd_mul = label, lr_mul, wd_mul
    return param


def uniform_matrix(*shape, std_scale, fan_in):
    bound = math.sqrt(3) * std_scale / math.sqrt(fan_in)  # uniform(-b, b) has std b/sqrt(3)
    return torch.empty(*shape).uniform_(-bound, bound)


def gate_input(x: Tensor) -> Tensor:
    return x[..., :GATE_CHANNELS]


# ----------------------------------------------------------------------------------------------
# Rotary position embedding, with YaRN stretching when the attention window grows


def rotary_frequencies(head_dim, fraction, base):
    """Angular frequency (radians per token) of each of the head_dim/2 rotation pairs.

    The first ``fraction`` of the pairs rotate, from 1 down to 1/base turns... radians per
    token; the remaining pairs have frequency 0 and so carry content only, no position.
    """
    pairs = head_dim // 2
    rotating = round(pairs * fraction)
    freqs = (1.0 / base) ** torch.linspace(0, 1, rotating, dtype=torch.float64)
    return torch.cat([freqs, torch.zeros(pairs - rotating, dtype=torch.float64)])


def yarn_frequencies(freqs, old_window, new_window, alpha, beta):
    """YaRN by parts: fast dims keep their frequency, slow dims are divided by new/old."""
    turns = old_window * freqs / (2 * math.pi)
    ramp = ((turns - alpha) / (beta - alpha)).clamp(0, 1)
    shrink = old_window / new_window
    return freqs * (shrink + ramp * (1 - shrink))


@torch.library.custom_op("speedrun::rotary_tables", mutates_args=())
def rotary_tables(freqs: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """cos and sin of position * frequency, each (1, length, 1, D/2) in float32, computed once
    a forward pass and read by every layer. An op, so that torch.compile keeps them as tables:
    as plain ops inductor fused sin and cos into each layer's norm and rotation, evaluating
    them for every head and layer again (0.38 ms a layer forward, 0.59 backward at T = 64K
    on an H100)."""
    positions = torch.arange(length, device=freqs.device, dtype=torch.float32)
    angles = positions[:, None] * freqs.float()[None, :]
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


@rotary_tables.register_fake
def _(freqs, length):
    shape = (1, length, 1, freqs.numel())
    return freqs.new_empty(shape, dtype=torch.float32), freqs.new_empty(shape, dtype=torch.float32)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (1, T, H, D) by position: pair j is (x[..., j], x[..., j + D/2])."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


# ----------------------------------------------------------------------------------------------
# Attention masks. One rule, two encodings:
#   query q may attend key k  <=>  k <= q  and  doc(k) == doc(q)
#                                  and  block(q) - block(k) < window (in blocks)
# doc(t) counts the BOS tokens up to t, so a document starts at its BOS.


def document_ids(inputs: Tensor) -> Tensor:
    return (inputs == BOS_ID).cumsum(0).to(torch.int32)


def dense_attention_mask(docs: Tensor, window_blocks, block_size) -> Tensor:
    """The (T, T) boolean mask of the rule above, for scaled_dot_product_attention."""
    t = torch.arange(docs.numel(), device=docs.device)
    q, k = t[:, None], t[None, :]
    block_distance = q // block_size - k // block_size
    return (k <= q) & (docs[:, None] == docs[None, :]) & (block_distance < window_blocks)


def _ordered(mask: Tensor):
    """Per query block: the number of True key blocks and their indices, True ones first."""
    counts = mask.sum(-1, dtype=torch.int32)
    indices = torch.argsort(mask.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts[None, None].contiguous(), indices.to(torch.int32)[None, None].contiguous()


def block_attention_masks(docs: Tensor, windows, block_size) -> list:
    """FlexAttention BlockMasks for each window, built from per-block document bounds.

    Only (T/block)^2 booleans are formed: a key block is skipped when it is outside the window,
    in the future, or holds only other documents; it is 'full' (no per-token mask needed) when
    it lies strictly before the query block and both hold a single, shared document.
    """
    num_blocks = docs.numel() // block_size
    first_doc = docs[::block_size]
    last_doc = docs[block_size - 1::block_size]
    b = torch.arange(num_blocks, device=docs.device)
    q, k = b[:, None], b[None, :]
    causal = k <= q
    overlaps = last_doc[None, :] >= first_doc[:, None]  # with k <= q: shares a document
    single_doc = first_doc[None, :] == last_doc[:, None]  # key block start .. query block end
    full = (k < q) & single_doc
    partial = causal & overlaps & ~full

    masks = []
    for window in windows:
        in_window = (q - k) < window
        kv_num, kv_idx = _ordered(partial & in_window)
        full_num, full_idx = _ordered(full & in_window)
        masks.append(BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                              BLOCK_SIZE=block_size,
                                              mask_mod=_mask_rule(docs, window, block_size)))
    return masks


def _mask_rule(docs, window, block_size):
    """The rule as a FlexAttention mask_mod. The window is repeated here although the block
    lists already enforce it: FlexAttention without compile applies only the mask_mod."""

    def rule(batch, head, q_idx, kv_idx):
        in_window = q_idx // block_size - kv_idx // block_size < window
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx]) & in_window

    return rule


# ----------------------------------------------------------------------------------------------
# The layers


ACTIVATIONS = {
    "relu2": lambda x: F.relu(x).square(),
    "gelu": F.gelu,
    "silu": F.silu,
    "swiglu": lambda x: F.silu(x[..., 0::2]) * x[..., 1::2],
    "geglu": lambda x: F.gelu(x[..., 0::2]) * x[..., 1::2],
}
GATED_ACTIVATIONS = ("swiglu", "geglu")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, value_embed: bool):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        hdim, dim = config.num_heads * config.head_dim, config.model_dim
        # W_q, W_k, W_v, W_o in one tensor so the matrix optimizer sees four (hdim, dim) matrices
        qkvo = uniform_matrix(4, hdim, dim, std_scale=config.init_std, fan_in=dim)
        qkvo[3].zero_()  # zero output projection: each block starts as the identity
        self.qkvo = make_param(qkvo, "attn")
        self.out_gate = make_param(torch.zeros(config.num_heads, GATE_CHANNELS), "gate") \
            if config.attn_gate else None
        self.value_gate = make_param(torch.zeros(config.num_heads, GATE_CHANNELS), "gate") \
            if value_embed else None

    def forward(self, x, ve, mask, rotary, scale):
        T = x.size(1)
        q, k, v = F.linear(x, self.qkvo[:3].flatten(0, 1).type_as(x)).view(
            1, T, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = apply_rotary(norm(q), *rotary), apply_rotary(norm(k), *rotary)
        if self.value_gate is not None:
            # 2 * sigmoid(0) = 1: the value embedding is added at full strength at the start
            gate = 2 * torch.sigmoid(F.linear(gate_input(x), self.value_gate.type_as(x)))
            v = v + gate[..., None] * ve.view_as(v)
        q, k, v = (t.transpose(1, 2) for t in (q * scale.type_as(q), k, v))
        if isinstance(mask, BlockMask):
            y = flex_attention(q, k, v, block_mask=mask, scale=1.0)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        y = y.transpose(1, 2)
        if self.out_gate is not None:
            # sigmoid(0) = 0.5: every head starts at half strength, the same for all heads
            y = y * torch.sigmoid(F.linear(gate_input(x), self.out_gate.type_as(x)))[..., None]
        return y.flatten(2) @ self.qkvo[3].type_as(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        dim, hidden = config.model_dim, config.ffn_dim
        width = 2 * hidden if config.activation in GATED_ACTIVATIONS else hidden
        self.activation = ACTIVATIONS[config.activation]
        self.fp8 = config.fp8_mlp
        self.fc = make_param(uniform_matrix(width, dim, std_scale=config.init_std, fan_in=dim),
                             "mlp")
        # (dim, hidden) gets no shape boost in the matrix optimizer, unlike (hidden, dim);
        # lr_mul hidden/dim^0.5 restores parity between the two.
        self.proj = make_param(torch.zeros(dim, hidden), "mlp",
                               lr_mul=max(1.0, hidden / dim) ** 0.5)

    def forward(self, x):
        fc = kernels.linear(x, self.fc, self.fp8)
        return kernels.linear(self.activation(fc), self.proj, self.fp8)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int, value_embed: bool):
        super().__init__()
        self.window = config.window_pattern[layer]
        self.attn = CausalSelfAttention(config, value_embed) if self.window != "-" else None
        self.mlp = MLP(config)
        # x = residual * x + x0_weight * x0 before the block, both learnable
        self.mix = make_param(torch.tensor([config.residual_init, config.x0_init]), "scalar",
                              wd_mul=0.0)

    def forward(self, x, x0, ve, masks, rotary, scale):
        x = self.mix[0] * x + self.mix[1] * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, masks[self.window], rotary, scale)
        return x + self.mlp(norm(x))


# ----------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, model_config: dict):
        super().__init__()
        config = GPTConfig.from_dict(model_config)
        self.config = config
        vocab, dim = config.padded_vocab, config.model_dim
        self.lm_head = make_param(torch.randn(vocab, dim) * config.lm_head_init_std, "lm_head")
        # Tied until untie(): the embedding is then a copy of lm_head that the trainer keeps
        # equal to it (fold_tied_grad before each optimizer step, sync_tied_weights after), the
        # same arithmetic as one shared tensor. The forward pass reads the same two tensors
        # before and after the untie, so torch.compile builds one graph, not two.
        self.embed = make_param(self.lm_head.detach().clone(), "embed")
        self.tied = True
        self.value_embeds = nn.ParameterList(
            [make_param(torch.zeros(vocab, dim), "value_embed") for _ in config.value_embed_layers])
        self.ve_table = {layer: t for t, layers in enumerate(config.value_embed_layers)
                         for layer in layers}
        self.blocks = nn.ModuleList(
            [Block(config, i, i in self.ve_table) for i in range(config.num_layers)])
        if config.smear_gate:
            self.smear_gate = make_param(torch.zeros(GATE_CHANNELS), "gate")
            self.smear_lambda = make_param(torch.zeros(1), "scalar", wd_mul=0.0)
        self.skip_lambdas = make_param(
            torch.full((len(config.skip_connections),), config.skip_lambda_init), "scalar",
            wd_mul=0.0)
        self.skip_gates = make_param(torch.zeros(len(config.skip_connections), GATE_CHANNELS),
                                     "gate")
        if config.backout_layer is not None:
            self.backout_lambda = make_param(torch.tensor([config.backout_init]), "scalar",
                                             wd_mul=0.0)
        # Attention geometry that changes during training: window sizes (in blocks), rotary
        # frequencies and the attention scale (both rescaled by YaRN). Tensors, not Python
        # numbers, so a window change does not recompile the compiled model.
        # (short, long) in blocks; 0 until the trainer's first set_windows call
        self.register_buffer("windows", torch.zeros(2, dtype=torch.int32))
        self.register_buffer("rotary_freqs", rotary_frequencies(
            config.head_dim, config.rope_fraction, config.rope_base).float())
        self.register_buffer("attn_scale", torch.tensor(config.attn_scale))

    # -- schedule hooks called by the trainer -------------------------------------------------

    def set_windows(self, short_blocks, long_blocks, yarn=True):
        """Set the attention windows (in blocks). When the long window changes and ``yarn`` is
        on, rescale rotary frequencies and the attention scale for the new length (YaRN).
        Final validation extends the window with ``yarn=False``, as the speedrun does."""
        old_long = int(self.windows[1])
        if yarn and old_long != long_blocks and old_long > 0:
            c = self.config
            old, new = old_long * c.block_size, long_blocks * c.block_size
            freqs = yarn_frequencies(self.rotary_freqs.double(), old, new, c.yarn_alpha,
                                     c.yarn_beta)
            self.rotary_freqs.copy_(freqs)
            self.attn_scale.mul_(1 + c.yarn_attn_factor * math.log(new / old))
        self.windows.copy_(torch.tensor([short_blocks, long_blocks]))

    def untie(self):
        """From now on the embedding trains on its own gradient; returns it."""
        if not self.tied:
            raise RuntimeError("embedding and lm_head are already untied")
        self.tied = False
        return self.embed

    @torch.no_grad()
    def fold_tied_grad(self):
        """While tied: the shared weight's gradient is the sum over its two uses. Collect it
        on lm_head, which the optimizer steps, and drop the embedding's."""
        if not self.tied or self.embed.grad is None:
            return
        if self.lm_head.grad is None:
            self.lm_head.grad = self.embed.grad
        else:
            self.lm_head.grad.add_(self.embed.grad)
        self.embed.grad = None

    @torch.no_grad()
    def sync_tied_weights(self):
        """While tied: the embedding takes lm_head's new values after an optimizer step."""
        if self.tied:
            self.embed.copy_(self.lm_head)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, inputs: Tensor, targets: Tensor | None = None, docs: Tensor | None = None):
        """inputs: (T,) token ids, T a multiple of the block size. Returns the mean loss over
        the T targets, or the (T, vocab_size) logits when no targets are given.

        ``docs`` (``document_ids(inputs)``) may be passed in: the trainer computes it outside
        the compiled graph, where inductor cannot lower FlexAttention's mask_mod reading a
        tensor computed inside the same graph (seen with torch 2.11 at T = 64K)."""
        if docs is None:
            docs = document_ids(inputs)
        hidden = self.hidden_states(inputs, docs)
        # (T, D) rows: indexing (1, T, V) logits would cost a full copy of their gradient in
        # the backward pass (seen in the profile: 4 ms a micro-batch)
        hidden, head = hidden[0], self.lm_head.type_as(hidden)
        if targets is not None and self.config.fused_loss:
            return kernels.linear_softcap_cross_entropy(
                hidden, head, targets, *self.softcap_args, fp8=self.config.fp8_lm_head)
        logits = F.linear(hidden, head)
        if targets is None:
            return self.softcap(logits.float())[:, :self.config.vocab_size]
        return kernels.softcap_cross_entropy_reference(logits, targets, *self.softcap_args)

    @property
    def softcap_args(self):
        """(cap, shift, temp, tanh) as kernels.py takes them."""
        c = self.config
        return c.logit_softcap, c.softcap_shift, c.softcap_temp, c.softcap_form == "tanh"

    def softcap(self, z):
        return kernels.softcap(z, *self.softcap_args)

    @staticmethod
    def compute_dtype(inputs):
        """The dtype of the residual stream, the activations and the matmul inputs: bf16 on
        CUDA; float32 elsewhere, the reference the CUDA path is tested against. Weights stay
        float32 and are cast where used; reductions (norms, softmax, loss) run in float32."""
        return torch.bfloat16 if inputs.is_cuda else torch.float32

    def attention_masks(self, inputs, docs):
        windows = (self.windows[0], self.windows[1])
        if inputs.is_cuda:
            short, long = block_attention_masks(docs, windows, self.config.block_size)
        else:
            short, long = (dense_attention_mask(docs, w, self.config.block_size)
                           for w in windows)
        return {"S": short, "L": long}

    def hidden_states(self, inputs, docs):
        config = self.config
        masks = self.attention_masks(inputs, docs)
        dtype = self.compute_dtype(inputs)
        x = F.embedding(inputs, self.embed)[None].to(dtype)
        if config.smear_gate:
            # Mix in the previous token, except across a document start.
            gate = torch.sigmoid(gate_input(x[:, 1:]) @ self.smear_gate.type_as(x))
            gate = gate * (inputs[1:] != BOS_ID)
            smear = self.smear_lambda.type_as(x) * gate[..., None] * x[:, :-1]
            x = torch.cat([x[:, :1], x[:, 1:] + smear], dim=1)
        x = x0 = norm(x)
        value_embeds = [F.embedding(inputs, t)[None].to(dtype) for t in self.value_embeds]
        skip_sources = {src: i for i, (src, _) in enumerate(config.skip_connections)}
        skip_targets = {dst: i for i, (_, dst) in enumerate(config.skip_connections)}
        saved, backout = {}, None
        rotary = rotary_tables(self.rotary_freqs, inputs.numel())
        for layer, block in enumerate(self.blocks):
            if layer in skip_targets:
                i = skip_targets[layer]
                strength = torch.sigmoid(self.skip_lambdas[i]) * 2 * torch.sigmoid(
                    gate_input(x0) @ self.skip_gates[i].type_as(x0))
                x = x + strength[..., None] * saved.pop(i)
            ve = value_embeds[self.ve_table[layer]] if layer in self.ve_table else None
            x = block(x, x0, ve, masks, rotary, self.attn_scale)
            if layer in skip_sources:
                saved[skip_sources[layer]] = x
            if layer == config.backout_layer:
                backout = x
        if backout is not None:
            x = x - self.backout_lambda.type_as(x) * backout
        return norm(x)

    # -- measurement and use ------------------------------------------------------------------

    def flops_per_token(self, seq_len, windows=None):
        """Training FLOPs (forward + backward = 3x forward) per token at ``windows`` (short,
        long), by default the current ones (read from the device: pass them to avoid a sync).

        Matmuls: 6 per weight. Attention: QK^T and AV, 4 * context * heads * head_dim forward,
        with the context of a token at the block-level window within one long document (what
        FlexAttention computes when documents outlast the window; shorter documents skip
        blocks, so this is the upper end of the work done).
        """
        c = self.config
        hdim = c.num_heads * c.head_dim
        matmul = sum(p.numel() for p in self.parameters()
                     if getattr(p, "label", None) in ("attn", "mlp"))
        matmul += c.padded_vocab * c.model_dim  # lm_head
        short, long = windows if windows is not None else self.windows.tolist()
        attention = 0.0
        for letter in c.window_pattern:
            if letter != "-":
                window = long if letter == "L" else short
                attention += 4 * hdim * mean_attended_keys(seq_len, window, c.block_size)
        return 6 * matmul + 3 * attention

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample continuations of a token list (no KV cache: the whole prefix each step)."""
        device = self.lm_head.device
        ids = list(prompt_ids)
        for _ in range(max_new_tokens):
            length = len(ids)
            padded = -(-length // self.config.block_size) * self.config.block_size
            # right padding with BOS starts a new document, so it cannot affect the prefix
            inputs = torch.tensor(ids + [BOS_ID] * (padded - length), device=device)
            logits = self(inputs)[length - 1].float()
            if temperature <= 0:
                ids.append(int(logits.argmax()))
                continue
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            ids.append(int(torch.multinomial(probs, 1, generator=generator)))
        return ids

    def generate_text(self, prompt, max_new_tokens=64, **kwargs):
        """Decode through tiktoken's GPT-2 encoding (imported here: optional at import)."""
        try:
            import tiktoken
        except ImportError as exc:
            raise RuntimeError("generate_text needs tiktoken: pip install tiktoken") from exc
        encoding = tiktoken.get_encoding("gpt2")
        ids = [BOS_ID] + encoding.encode_ordinary(prompt)
        out = self.generate(ids, max_new_tokens, **kwargs)
        return encoding.decode([t for t in out[1:] if t < self.config.vocab_size])


def mean_attended_keys(seq_len, window_blocks, block_size):
    """Average number of keys a query sees: all earlier blocks up to the window, plus the
    causal part of its own block, over a sequence of seq_len tokens."""
    num_blocks = max(1, seq_len // block_size)
    total = sum(min(i, window_blocks - 1) for i in range(num_blocks))
    return total / num_blocks * block_size + (block_size + 1) / 2
