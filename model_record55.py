"""Record #55's GPT (modded-nanogpt, December 2025), kept so that config/record55.py can be
run beside the current recipe (``model.py``).

Read top to bottom: the config (every key of its ``model_config``), the block, and the GPT.
The pieces live in ``layers/``: attention masks, rotary embedding and YaRN, attention
(``CausalSelfAttention``), the MLP, embeddings (value embeddings, the smear gate, the
embedding tie) and residual routing (skips, backout). The lm_head and its softcapped
cross-entropy are one op in ``kernels.py``.

Shapes: the model takes one packed sequence of T token ids (T a multiple of the attention
block). Documents start with BOS (50256) and attend only within themselves. On CUDA the
residual stream and activations are bf16 (``GPT.compute_dtype``), on the CPU float32.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.attention import CausalSelfAttention
from layers.core import make_param, norm
from layers.embeddings import EmbeddingTie, SmearGate, ValueEmbeddings
from layers.head import SpeedrunLM
from layers.masks import attention_masks, attention_rows, document_ids
from layers.mlp import ACTIVATIONS, MLP
from layers.rotary import Yarn
from layers.routing import Backout, SkipConnections
from utils import ConfigError, check_ranges


@dataclass(frozen=True)
class Record55Config:
    """``model_config`` of config/record55.py; every key is required."""

    architecture: str  # "record55"
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
    rope_base: float  # slowest rotary frequency is 1/rope_base radians per token
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
    fp8_lm_head: bool  # that op's matmuls in float8 on CUDA capability >= 8.9 (kernels.py)
    fp8_mlp: bool  # the MLP's matmuls in float8 there too (kernels.linear)
    init_std: float  # matrices: uniform with std init_std / sqrt(fan_in)
    lm_head_init_std: float  # the (tied) head/embedding: normal with this std

    def __post_init__(self):
        check_ranges("model_config", self,
                     positive=("vocab_size", "vocab_multiple", "num_layers", "model_dim",
                               "num_heads", "head_dim", "ffn_dim", "block_size", "rope_base",
                               "logit_softcap", "softcap_temp"),
                     non_negative=("init_std", "lm_head_init_std"),
                     fractions=("rope_fraction",))
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
            raise ConfigError("model_config: " + "; ".join(problems))

    def receptive_field(self, windows) -> int:
        """How many tokens back a token's output can depend on at ``windows`` (short, long) in
        blocks: each attention layer reaches up to its window of blocks back, the smear gate
        one token more."""
        c = self
        reach = 1  # smear
        for letter in c.window_pattern:
            if letter != "-":
                reach += (windows[1] if letter == "L" else windows[0]) * c.block_size
        return reach

    @property
    def padded_vocab(self):
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


class Block(nn.Module):
    def __init__(self, config: Record55Config, layer: int, value_embed: bool):
        super().__init__()
        self.window = config.window_pattern[layer]
        self.attn = CausalSelfAttention(config, value_embed) if self.window != "-" else None
        self.mlp = MLP(config, proj_lr_mul=max(1.0, config.ffn_dim / config.model_dim) ** 0.5)
        # x = residual * x + x0_weight * x0 before the block, both learnable
        self.mix = make_param(torch.tensor([config.residual_init, config.x0_init]), "scalar",
                              wd_mul=0.0)

    def forward(self, x, x0, ve, masks, rotary, scale, cache=None):
        x = self.mix[0] * x + self.mix[1] * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, masks[self.window], rotary, scale, cache)
        return x + self.mlp(norm(x))


class GPT55(SpeedrunLM):
    def __init__(self, config: Record55Config):
        super().__init__()
        self.config = config
        vocab, dim = config.padded_vocab, config.model_dim
        self.lm_head = make_param(torch.randn(vocab, dim) * config.lm_head_init_std, "lm_head")
        self.embed = make_param(self.lm_head.detach().clone(), "embed")
        self.tie = EmbeddingTie(self.embed, self.lm_head)
        self.prefix_table = None  # next-token prediction only
        self.smear = SmearGate() if config.smear_gate else None
        self.skips = SkipConnections(config.skip_connections, config.skip_lambda_init)
        self.backout = (Backout(config.backout_layer, config.backout_init)
                        if config.backout_layer is not None else None)
        self.value_embeds = ValueEmbeddings(vocab, dim, config.value_embed_layers)
        self.blocks = nn.ModuleList(
            [Block(config, i, i in self.value_embeds.table_of) for i in range(config.num_layers)])
        self.yarn = Yarn(config.head_dim, config.rope_fraction, config.rope_base,
                         config.attn_scale, config.block_size, config.yarn_alpha,
                         config.yarn_beta, config.yarn_attn_factor)

    # -- decoding -----------------------------------------------------------------------------

    def start_decoding(self) -> "DecodeState":
        return DecodeState(self)

    @torch.no_grad()
    def decode(self, inputs: Tensor, state: "DecodeState") -> Tensor:
        """The logits (n, vocab_size) of ``inputs`` (n,), the tokens that continue the sequence
        ``state`` holds (``start_decoding()`` holds none): as a forward pass over the
        whole sequence would give them (tests/test_model_record55.py), from the keys and
        values each attention layer cached. Attention reads only the keys its window reaches,
        so a token costs the same however long the sequence. The state then holds ``inputs``
        too."""
        docs = state.extend(inputs)
        bs = self.config.block_size
        masks = {letter: attention_rows(docs, inputs.numel(), window, bs)
                 for letter, window in zip("SL", self.yarn.current, strict=True)}
        rotary = tuple(t[:, -inputs.numel():] for t in self.yarn.tables(docs.numel()))
        hidden = self.blocks_output(inputs, masks, rotary, state)[0]
        return self.logits(hidden)[:, :self.config.vocab_size]

    def hidden_states(self, inputs, docs):
        windows = (self.yarn.windows[0], self.yarn.windows[1])
        masks = dict(zip("SL", attention_masks(docs, windows, self.config.block_size,
                                               inputs.is_cuda), strict=True))
        return self.blocks_output(inputs, masks, self.yarn.tables(inputs.numel()))

    def blocks_output(self, inputs, masks, rotary, state=None):
        """Embedding, blocks and final norm of ``inputs``; with a DecodeState, the tokens
        continue the ones it holds (``decode``)."""
        dtype = self.compute_dtype(inputs)
        x = F.embedding(inputs, self.embed)[None].to(dtype)
        if self.smear is not None:
            previous = None if state is None else state.previous
            if state is not None:
                state.previous = x[:, -1:]
            x = self.smear(x, inputs, previous)
        x = x0 = norm(x)
        value_embeds = self.value_embeds(inputs, dtype)
        saved, backout = {}, None
        for layer, block in enumerate(self.blocks):
            cache = None if state is None else state.caches[layer]
            x = self.skips.arrive(layer, x, x0, saved)
            x = block(x, x0, value_embeds.get(layer), masks, rotary, self.yarn.attn_scale, cache)
            self.skips.leave(layer, x, saved)
            if self.backout is not None and layer == self.backout.layer:
                backout = x
        if backout is not None:
            x = self.backout(x, backout)
        return norm(x)

    # -- measurement --------------------------------------------------------------------------

    def flops_per_token(self, seq_len, windows):
        """Training FLOPs (forward + backward = 3x forward) per token at ``windows`` (short,
        long).

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
        short, long = windows
        attention = 0.0
        for letter in c.window_pattern:
            if letter != "-":
                window = long if letter == "L" else short
                attention += 4 * hdim * mean_attended_keys(seq_len, window, c.block_size)
        return 6 * matmul + 3 * attention


def mean_attended_keys(seq_len, window_blocks, block_size):
    """Average number of keys a query sees: all earlier blocks up to the window, plus the
    causal part of its own block, over a sequence of seq_len tokens."""
    num_blocks = max(1, seq_len // block_size)
    total = sum(min(i, window_blocks - 1) for i in range(num_blocks))
    return total / num_blocks * block_size + (block_size + 1) / 2


class DecodeState:
    """What ``GPT55.decode`` keeps between calls: each attention layer's cache (its own kind,
    from ``new_cache()``), the document id of every token so far, and the last token's
    embedding (the smear gate mixes it into the next)."""

    def __init__(self, model: GPT55):
        self.caches = [block.attn.new_cache() if block.attn is not None else None
                       for block in model.blocks]
        self.docs = None
        self.previous = None

    def extend(self, inputs: Tensor) -> Tensor:
        """Add the new tokens' document ids; returns those of the whole sequence."""
        docs = document_ids(inputs)
        if self.docs is not None:
            docs = torch.cat([self.docs, docs + self.docs[-1]])
        self.docs = docs
        return docs
