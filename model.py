"""The speedrun GPT: record #89 of modded-nanogpt (July 2026) on one GPU, and by its config
record #92's (August 2026, config/record92.py).

Read top to bottom: the config (every key of ``model_config``), ``build_model`` (which also
builds record #55's model, ``model_record55.py``, for config/record55.py), and the GPT. The
pieces live in ``layers/``: the attention rule as masks, rotary embedding and YaRN,
``GatedAttention`` (paired heads, key offset, XSA, DC, gates), the MLP, the bigram hash
embedding, value embeddings and the smear gate, the gate networks and dense connections
(``layers/mudd.py``), and the head (``layers/head.py``: the prediction targets, and
``SpeedrunLM``, the loss, logits and dtype plan both GPTs share). The lm_head and its
softcapped cross-entropy over those targets are one op in ``kernels.py``.

The layers, for the record's 11 (window_pattern "SSSLSS-SSSL"): 0, 2, 5, 9 paired heads; 3
and 10 long windows with the key offset; 6 no attention, a gated skip from layer 3's output
instead; 1, 3, 4, 7 gated XSA; 3 and 10 output gates; 10 DC; 1, 2, 8, 9, 10 value
embeddings. Layers after 7 read layer 7's output as their attention input (what is left of
the record's hyperconnections); the last layer mixes saved states through its dense
connections, and so does the final state before the head. Each layer then updates the stream
as x <- r_a x + p_a attn + g_x0 x0 + g_bigram bigram, and x <- r_m x + p_m mlp(norm x).

Record #92's model is the same GPT with other roles: 7 layers attend (0, 1, 2, 3, 5, 8, 10),
narrow Q/K heads (64 of 128) on the short-window layers with their own rotary scale and YaRN,
halved V/O on 1 and 8, layers 4 and 9 with only an MLP, layer 7 removed, a second MLP beside
layer 8's, x0 and the n-gram table entering on fewer layers, no DC, and a final mix of ten
states refined per channel group (the keys after ``dc_window`` below).

Shapes: one packed sequence of T token ids (T a multiple of the attention block). Documents
start with BOS and attend only within themselves. On CUDA the residual stream and activations
are bf16, on the CPU float32.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from data.shards import BOS_ID
from layers.attention import GatedAttention
from layers.bigram import BigramEmbedding
from layers.core import make_param, norm
from layers.embeddings import EmbeddingTie, SmearGate, ValueEmbeddings, rows
from layers.head import SpeedrunLM
from layers.masks import attention_masks, document_ids
from layers.mlp import ACTIVATIONS, MLP
from layers.mudd import MUDD_SCALE, CoefficientNet, GateLayout, GateNetworks
from layers.ngram import NgramEmbedding
from layers.rotary import Yarn, rotary_tables
from utils import ConfigError, build_section, check_ranges

# the dense connections' initial coefficients (before MUDD_SCALE): the last layer keeps its
# input (10 sqrt(1.1)), its attention and MLP outputs (10), adds the value embedding at
# twice its strength (20) and a little of the bigram embedding (0.5); the final state loses
# half of layer 7's (-5), the backout of record #55
LAST_LAYER_BIAS = {6: 20.0, 7: 20.0, 8: 10 * math.sqrt(1.1), 9: 10.0, 11: 0.5,
                   12: 10 * math.sqrt(1.1), 13: 10.0}
FINAL_BIAS = {1: -5.0}


@dataclass(frozen=True)
class GPTConfig:
    """``model_config``; every key is required, so config/record89.py is the one source."""

    architecture: str  # "record89" (this model) or "record55" (model_record55.py)
    vocab_size: int  # 50257 for GPT-2 BPE
    vocab_multiple: int  # pad the vocabulary to a multiple of this (128: 50257 -> 50304)
    num_layers: int
    model_dim: int
    num_heads: int
    head_dim: int
    ffn_dim: int
    activation: str  # relu2 | gelu | silu | swiglu | geglu
    block_size: int  # FlexAttention block; windows are counted in these blocks
    window_pattern: str  # one letter a layer: L long window, S short window, - no attention
    attn_scale: float  # attention logit scale (with QK norm, ~0.1)
    rope_base: float
    rope_fraction: float  # share of each head's dims that rotate
    yarn_alpha: float
    yarn_beta: float
    yarn_attn_factor: float
    value_embed_layers: tuple  # one tuple of layer indices per value-embedding table
    value_embed_init_std: float
    paired_head_layers: tuple  # heads h and h + H/2 attend to each other's keys (#191)
    xsa_layers: tuple  # gated exclusive self-attention (#264, #317)
    attn_gate_layers: tuple  # output gated per head by the gate networks
    dc_layers: tuple  # post-softmax cross-head mix (#315)
    dc_window: int  # DC's window in tokens (at most block_size)
    # record #92's layer roles: "-" layers are layer 6's kind (the skip from skip_source, an
    # MLP) unless named here: with an MLP only, or removed (neither: the residual scales and
    # the x0 injection stay)
    mlp_only_layers: tuple
    removed_layers: tuple
    parallel_mlp_layers: tuple  # a second MLP beside the first, on the same input
    x0_layers: tuple  # layers that add x0 back, with a gate each
    bigram_layers: tuple  # layers that add the bigram (n-gram) embedding; 0: before the first
    # record #92's mixed widths: Q/K heads this wide on the short-window layers (0: head_dim),
    # every dim rotating, their own attention scale and YaRN (driven by the short window)
    short_qk_dim: int
    short_attn_scale: float
    half_vo_layers: tuple  # V and O at half the head width
    # 0: record #89's final mix of five saved states; n: record #92's of ten (the other value
    # embeddings, the last MLP's input, the shared input normed), each coefficient refined per
    # group of model_dim / n channels
    final_mix_groups: int
    key_offset: bool  # long-window layers: the unrotated half of a key is its predecessor's
    bigram_rows: int  # hash table of (previous, current) token pairs (#201); 0: none
    bigram_sign_rows: int  # random +-1 vectors of the sign trick (#299)
    gate_hidden: int  # hidden width of the gate networks
    mudd_hidden: int  # hidden width of the dense connections' networks
    post_gate_layer: int  # the second gate network reads the stream where this layer begins
    shared_input_layer: int  # later layers take this layer's output as attention input
    skip_source: int  # a layer without attention adds this layer's output instead
    residual_init: float  # r_a, r_m at init (p_a, p_m start at 1)
    skip_lambda_init: float  # the skip's strength is sigmoid(lambda) * gate
    logit_softcap: float
    softcap_form: str  # sigmoid: cap * sigmoid((z + shift) / temp); tanh: cap * tanh(z / cap)
    softcap_shift: float
    softcap_temp: float
    prefix_prediction: bool  # build the GPT-2 prefix table for prefix-token prediction (#337)
    fp8_lm_head: bool  # the lm_head's matmuls in float8 on CUDA capability >= 8.9
    fp8_mlp: bool  # the MLP's matmuls in float8 there too (kernels.linear)
    fused_mlp: bool  # with fp8_mlp: record #89's relu^2 MLP kernels instead (kernels.relu2_mlp)
    init_std: float  # matrices: uniform with std init_std / sqrt(fan_in)
    lm_head_init_std: float
    mlp_proj_lr_mul: float  # the record's c_proj: its shape factor 2 times its own 2
    # record #92's n-gram table in the bigram table's place (layers/ngram.py): bigram_rows rows,
    # half looked up by the token pair, half by the last three tokens; trained by row-wise Adam
    ngram_table: bool = False
    ngram_bf16: bool = False  # the n-gram table's weights in bf16, as the record's (half the bytes)
    # the attention layers' Q, K, V and output projections in float8 there too (kernels.linear,
    # as fp8_mlp's; record #92 runs its QKV in float8)
    fp8_attn: bool = False
    # relu2 with fp8_mlp (not fused_mlp): the hidden activation and its gradient cast at
    # record #92's delayed scales (the previous step's amax with headroom) by one kernel each
    # (kernels.float8_relu2_mlp), no amax pass over them
    fp8_delayed_scales: bool = False

    def __post_init__(self):
        check_ranges("model_config", self,
                     positive=("vocab_size", "vocab_multiple", "num_layers", "model_dim",
                               "num_heads", "head_dim", "ffn_dim", "block_size", "rope_base",
                               "logit_softcap", "softcap_temp", "gate_hidden", "mudd_hidden"),
                     non_negative=("init_std", "lm_head_init_std", "value_embed_init_std",
                                   "bigram_rows", "bigram_sign_rows"),
                     fractions=("rope_fraction",))
        L, problems = self.num_layers, []
        if len(self.window_pattern) != L or set(self.window_pattern) - set("LS-"):
            problems.append(f"window_pattern {self.window_pattern!r} needs one of L, S, - for "
                            f"each of the {L} layers")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} not in {sorted(ACTIVATIONS)}")
        if self.fused_mlp and self.activation != "relu2":
            problems.append(f"fused_mlp is relu^2's MLP: activation must be relu2, not "
                            f"{self.activation!r}")
        if self.softcap_form not in ("sigmoid", "tanh"):
            problems.append(f"softcap_form {self.softcap_form!r} must be sigmoid or tanh")
        if self.head_dim % 4 or self.num_heads % 2:
            problems.append("head_dim must be a multiple of 4 and num_heads even")
        if not 0 < self.dc_window <= self.block_size:
            problems.append(f"dc_window {self.dc_window} must be in [1, block_size]")
        attention = {i for i in range(L) if self.window_pattern[i:i + 1] in ("L", "S")}
        last = L - 1
        no_attention = set(range(L)) - attention
        mlp_only, removed = set(self.mlp_only_layers), set(self.removed_layers)
        if not mlp_only | removed <= no_attention or mlp_only & removed:
            problems.append(f"mlp_only_layers {self.mlp_only_layers} and removed_layers "
                            f"{self.removed_layers} must name distinct layers marked - in "
                            f"window_pattern")
        for name in ("x0_layers", "bigram_layers"):
            layers = getattr(self, name)
            if len(set(layers)) != len(layers) or not set(layers) <= (
                    attention | mlp_only | removed) - {last}:
                problems.append(f"{name} {layers} must name distinct layers before the last "
                                f"that are not skip layers")
        if not set(self.parallel_mlp_layers) <= set(range(L)) - removed:
            problems.append(f"parallel_mlp_layers {self.parallel_mlp_layers} must name layers "
                            f"with an MLP")
        if self.short_qk_dim and (self.short_qk_dim % 2 or self.short_qk_dim > self.head_dim
                                  or self.short_attn_scale <= 0):
            problems.append(f"short_qk_dim {self.short_qk_dim} must be even, at most head_dim, "
                            f"with a positive short_attn_scale")
        if self.final_mix_groups and self.model_dim % self.final_mix_groups:
            problems.append(f"final_mix_groups {self.final_mix_groups} must divide model_dim")
        roles = {"value_embed_layers": [i for t in self.value_embed_layers for i in t],
                 "paired_head_layers": self.paired_head_layers, "xsa_layers": self.xsa_layers,
                 "attn_gate_layers": self.attn_gate_layers, "dc_layers": self.dc_layers,
                 "half_vo_layers": self.half_vo_layers}
        for name, layers in roles.items():
            if len(set(layers)) != len(layers) or not set(layers) <= attention:
                problems.append(f"{name} {layers} must name distinct attention layers")
        if set(self.paired_head_layers) & set(self.xsa_layers + self.dc_layers):
            problems.append("XSA and DC need unpaired heads")
        if set(self.half_vo_layers) & set(self.dc_layers + self.paired_head_layers + (last,)):
            problems.append("half_vo_layers cannot be DC, paired or the last layer")
        if self.dc_layers and not set(self.dc_layers) <= {last}:
            problems.append("DC takes its mixes from the last layer's gates: only the last layer")
        if last not in attention or self.window_pattern[last] != "L":
            problems.append("the last layer (dense connections) needs the long window")
        for name in ("post_gate_layer", "shared_input_layer", "skip_source"):
            if not 0 < getattr(self, name) < last:
                problems.append(f"{name} must be a layer between the first and the last")
        if self.ngram_bf16 and not self.ngram_table:
            problems.append("ngram_bf16 is the n-gram table's: it needs ngram_table")
        signs = self.bigram_sign_rows
        if self.ngram_table and (self.bigram_rows < 8 or self.bigram_rows % 2
                                 or signs < 1 or signs & (signs - 1)):
            problems.append(f"ngram_table needs an even bigram_rows of at least 8 and a power of "
                            f"two of bigram_sign_rows, got {self.bigram_rows} and {signs}")
        if problems:
            raise ConfigError("model_config: " + "; ".join(problems))

    def receptive_field(self, windows) -> int:
        """How many tokens back a token's output can depend on at ``windows`` (short, long) in
        blocks: each attention layer reaches its window back (a paired layer half of it, in
        rows), the key offset one token more, and the token-level pieces two: the smear gate
        and the bigram hash read one token back, the n-gram table's trigram two."""
        c = self
        reach = 2
        for letter in c.window_pattern:
            if letter != "-":
                reach += (windows[1] if letter == "L" else windows[0]) * c.block_size + 1
        return reach

    @property
    def skip_layers(self) -> list:
        """The layers without attention that add ``skip_source``'s output (layer 6's kind)."""
        return [i for i, letter in enumerate(self.window_pattern) if letter == "-"
                and i not in self.mlp_only_layers + self.removed_layers]

    @property
    def padded_vocab(self):
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


def model_config(values: dict):
    """The typed ``model_config`` of either architecture."""
    if isinstance(values, dict) and values.get("architecture") == "record55":
        from model_record55 import Record55Config

        return build_section(Record55Config, "model_config", values)
    return build_section(GPTConfig, "model_config", values)


def build_model(config) -> nn.Module:
    if isinstance(config, GPTConfig):
        return GPT(config)
    from model_record55 import GPT55

    return GPT55(config)


class Block(nn.Module):
    """A layer's attention (or none), its MLP (none, one or two on the same input) and its four
    residual scales."""

    def __init__(self, config: GPTConfig, layer: int, value_embed: bool):
        super().__init__()
        letter = config.window_pattern[layer]
        narrow = letter == "S" and config.short_qk_dim
        self.window = letter
        self.attn = None
        if letter != "-":
            half_vo = layer in config.half_vo_layers
            self.attn = GatedAttention(
                config, paired=layer in config.paired_head_layers,
                key_offset=config.key_offset and letter == "L",
                value_gate=value_embed and layer != config.num_layers - 1,
                qk_dim=config.short_qk_dim if narrow else 0,
                v_dim=config.head_dim // 2 if half_vo else 0)
        self.mlp = self.mlp2 = None
        if layer not in config.removed_layers:
            self.mlp = MLP(config, proj_lr_mul=config.mlp_proj_lr_mul, fused=config.fused_mlp,
                           delayed=config.fp8_delayed_scales)
        if layer in config.parallel_mlp_layers:
            self.mlp2 = MLP(config, proj_lr_mul=config.mlp_proj_lr_mul, fused=config.fused_mlp,
                            delayed=config.fp8_delayed_scales)
        if layer != config.num_layers - 1:  # the last layer's are its dense connections
            self.residual = make_param(torch.full((2,), config.residual_init), "resid_lambda",
                                       wd_mul=0.0)
            self.post = make_param(torch.ones(2), "post_lambda", wd_mul=0.0)

    def mlp_out(self, normed):
        out = self.mlp(normed)
        return out if self.mlp2 is None else out + self.mlp2(normed)

    def mlp_update(self, x):
        if self.mlp is None:
            return self.residual[1].type_as(x) * x
        return self.residual[1].type_as(x) * x + self.post[1].type_as(x) * self.mlp_out(norm(x))


class GPT(SpeedrunLM):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        vocab, dim = config.padded_vocab, config.model_dim
        self.lm_head = make_param(torch.randn(vocab, dim) * config.lm_head_init_std, "lm_head")
        self.embed = make_param(self.lm_head.detach().clone(), "embed")
        self.register_buffer("embed_grad", None, persistent=False)  # see grads_in_place
        self.tie = EmbeddingTie(self.embed, self.lm_head)
        self.smear = SmearGate(across_documents=True, gate_lr_mul=0.01, gate_wd_mul=0.0)
        self.value_embeds = ValueEmbeddings(vocab, dim, config.value_embed_layers,
                                            init_std=config.value_embed_init_std)
        if not config.bigram_rows:
            self.bigram = None
        elif config.ngram_table:
            self.bigram = NgramEmbedding(config.bigram_rows, dim, config.bigram_sign_rows,
                                         torch.bfloat16 if config.ngram_bf16 else torch.float32)
        else:
            self.bigram = BigramEmbedding(config.bigram_rows, dim, config.bigram_sign_rows)
        self.layout = GateLayout(config)
        self.gates = GateNetworks(config, self.layout)
        self.skip_lambda = make_param(torch.tensor(config.skip_lambda_init), "scalar",
                                      wd_mul=0.0)
        self.blocks = nn.ModuleList([Block(config, i, i in self.value_embeds.table_of)
                                     for i in range(config.num_layers)])
        self.last_mix = CoefficientNet(dim, config.mudd_hidden, _bias(14, LAST_LAYER_BIAS),
                                       "mudd")
        mix = 5 + (len(config.value_embed_layers) + 1 if config.final_mix_groups else 0)
        self.final_mix = CoefficientNet(dim, config.mudd_hidden, _bias(mix, FINAL_BIAS), "mudd",
                                        groups=config.final_mix_groups)
        self.yarn = Yarn(config.head_dim, config.rope_fraction, config.rope_base,
                         config.attn_scale, config.block_size, config.yarn_alpha,
                         config.yarn_beta, config.yarn_attn_factor, config.short_qk_dim,
                         config.short_attn_scale)
        self.register_buffer("prefix_table", _prefix_table(config))

    def grads_in_place(self) -> list:
        """From now on the embedding tables' lookups add their gradients into buffers
        (``layers.embeddings.rows``, training_config.table_grads_in_place); returns the
        (table, buffer) pairs for ``collect_table_grads``."""
        self.embed_grad = torch.zeros_like(self.embed)
        bigram = self.bigram.grads_in_place() if self.bigram is not None else []
        return [(self.embed, self.embed_grad)] + self.value_embeds.grads_in_place() + bigram

    # -- decoding -----------------------------------------------------------------------------

    def start_decoding(self) -> "DecodeState":
        return DecodeState()

    @torch.no_grad()
    def decode(self, inputs: Tensor, state: "DecodeState") -> Tensor:
        """The logits (n, vocab_size) of ``inputs`` (n,), the tokens that continue the sequence
        ``state`` holds (``start_decoding()`` holds none), as a forward pass over the whole
        sequence would give them (tests/test_model.py). No keys and values are cached (the
        paired heads, the key offset, DC and the dense connections would each need their own
        cache): the forward pass runs again over the new tokens behind the
        ``receptive_field`` tokens they can depend on, so a token costs the same however long
        the sequence. The state then holds ``inputs`` too."""
        bs = self.config.block_size
        reach = self.config.receptive_field(self.yarn.current)
        tokens = state.extend(inputs, reach + bs, bs)
        first = tokens.numel() - inputs.numel()
        start = max(0, first - reach) // bs * bs  # whole blocks, as the sequence was cut
        window = tokens[start:]
        padded = torch.cat([window, window.new_full((-window.numel() % bs,), BOS_ID)])
        hidden = self.hidden_states(padded, document_ids(padded))[0]
        rows = hidden[first - start:tokens.numel() - start]
        return self.logits(rows)[:, :self.config.vocab_size]

    def masks(self, docs: Tensor, on_gpu: bool) -> dict:
        """"S" and "L" for the sequence, "P" (the short window) for the doubled sequence of
        the paired layers; windows in tokens, as FlashAttention's."""
        block = self.config.block_size
        short, long = (w * block for w in (self.yarn.windows[0], self.yarn.windows[1]))
        masks = dict(zip("SL", attention_masks(docs, (short, long), block, on_gpu, True),
                         strict=True))
        if self.config.paired_head_layers:
            (masks["P"],) = attention_masks(docs, (short,), block, on_gpu, True,
                                            rows_per_token=2)
        return masks

    def hidden_states(self, inputs, docs):
        c, layout = self.config, self.layout
        dtype, last = self.compute_dtype(inputs), c.num_layers - 1
        masks = self.masks(docs, inputs.is_cuda)
        pairs = round(c.head_dim // 2 * c.rope_fraction)
        geometry = {"L": (rotary_tables(self.yarn.rotary_freqs[:pairs], 2 * inputs.numel()),
                          self.yarn.attn_scale)}
        geometry["S"] = geometry["L"]
        if c.short_qk_dim:
            geometry["S"] = (rotary_tables(self.yarn.short_freqs, 2 * inputs.numel()),
                             self.yarn.short_scale)
        x0 = norm(self.smear(rows(self.embed, inputs, self.embed_grad)[None].to(dtype), inputs))
        value_embeds = self.value_embeds(inputs, dtype)
        bigram = self.bigram(inputs, dtype) if self.bigram is not None else torch.zeros_like(x0)
        gates = [self.gates(0, x0), None]
        x = x0 + layout.get(gates, "bigram", 0) * bigram if 0 in c.bigram_layers else x0
        saved = {"start": x}
        for layer, block in enumerate(self.blocks):
            if layer == c.post_gate_layer:
                gates[1] = self.gates(1, x)
            if layer == last:
                saved["before_last"] = x
                x, saved["last_mlp_input"] = self.last_layer(
                    block, x, bigram, value_embeds, saved, gates, masks, geometry["L"], docs)
            elif layer in c.skip_layers:
                skip = torch.sigmoid(self.skip_lambda).type_as(x) * layout.get(gates, "skip",
                                                                                layer)
                x = block.mlp_update(x + skip * saved[c.skip_source])
            else:
                a = None
                if block.attn is not None:
                    source = saved[c.shared_input_layer] if layer > c.shared_input_layer else x
                    a_in = norm(source)
                    aux_v = None
                    if layer in value_embeds:
                        aux_v = block.attn.gated_value(a_in, value_embeds[layer])
                    mask = masks["P" if block.attn.paired else block.window]
                    a = block.attn(a_in, aux_v, mask, *geometry[block.window],
                                   xsa=layout.get(gates, "xsa", layer),
                                   gate=layout.get(gates, "attn_gate", layer))
                x = block.residual[0].type_as(x) * x
                if a is not None:
                    x = x + block.post[0].type_as(x) * a
                if layer in c.x0_layers:
                    x = x + layout.get(gates, "x0", layer) * x0
                if layer and layer in c.bigram_layers:
                    x = x + layout.get(gates, "bigram", layer) * bigram
                x = block.mlp_update(x)
            saved[layer] = x
        return norm(self.mix_final(x, saved, value_embeds))

    def mix_final(self, x, saved, value_embeds):
        """The final state plus saved states, each times a per-token coefficient: the residual
        start, the shared attention input, the last layer's input, the first value embedding
        and the skip's source; with ``final_mix_groups`` also the other value embeddings, the
        last MLP's input and the shared input normed, each coefficient per channel group."""
        c = self.config
        shared = saved[c.shared_input_layer]
        sources = [saved["start"], shared, saved["before_last"],
                   value_embeds[c.value_embed_layers[0][0]], saved[c.skip_source]]
        if c.final_mix_groups:
            sources += [value_embeds[t[0]] for t in c.value_embed_layers[1:]]
            sources += [saved["last_mlp_input"], norm(shared)]
        nu = self.final_mix(x) * MUDD_SCALE
        if not c.final_mix_groups:
            nu = nu[..., None]  # one group
        grouped = x.unflatten(-1, (nu.size(-1), -1))
        for i, s in enumerate(sources):
            grouped = grouped + nu[..., i, :, None] * s.unflatten(-1, (nu.size(-1), -1))
        return grouped.flatten(-2)

    def last_layer(self, block, x, bigram, value_embeds, saved, gates, masks, geometry, docs):
        """The last layer with its dense connections: 14 per-token coefficients mu mix the
        residual start, layer ``shared_input_layer``'s output and the input into the values,
        the input, and the output. Returns the output and the MLP's input."""
        c, layout, last = self.config, self.layout, self.config.num_layers - 1
        H, d = c.num_heads, c.head_dim
        start, shared = saved["start"], saved[c.shared_input_layer]
        mu = self.last_mix(x) * MUDD_SCALE
        m = [mu[..., i:i + 1] for i in range(14)]
        dense_v = m[0] * start + m[1] * shared + m[2] * x
        x = (1 + m[5]) * x + m[3] * start + m[4] * shared
        ve_scale = torch.cat([m[6].expand(-1, -1, H // 2), m[7].expand(-1, -1, H // 2)], -1)
        aux_v = (ve_scale[..., None] * value_embeds[last].view(1, -1, H, d)
                 + dense_v.view(1, -1, H, d))
        dc = None
        if last in c.dc_layers:
            dc = (layout.get(gates, "dc_w1", last), layout.get(gates, "dc_w2", last),
                  c.dc_window, c.block_size)
        a = block.attn(norm(shared), aux_v, masks[block.window], *geometry, docs=docs,
                       gate=layout.get(gates, "attn_gate", last), dc=dc)
        x = m[8] * x + m[9] * a + m[10] * start + m[11] * bigram
        normed = norm(x)
        return m[12] * x + m[13] * block.mlp_out(normed), normed

    # -- measurement --------------------------------------------------------------------------

    def flops_per_token(self, seq_len, windows):
        """Training FLOPs (forward + backward = 3x forward) per token at ``windows`` (short,
        long) in blocks. Matmuls: 6 per weight read (a narrow layer's unread rows are none).
        Attention: QK^T and AV, 2 * keys * heads * (Q/K width + V width) forward, keys at the
        token window within one long document (the paired layers: twice the rows, half the
        heads, the same window in rows)."""
        c = self.config
        matmul = sum(p.numel() for p in self.parameters() if getattr(p, "label", None) == "mlp")
        matmul += c.padded_vocab * c.model_dim  # lm_head
        attention = 0.0
        for block in self.blocks:
            if block.attn is not None:
                a = block.attn
                matmul += sum(w.numel() for w in a.weights())
                window = (windows[1] if block.window == "L" else windows[0]) * c.block_size
                keys = min(window + 1, seq_len)
                attention += 2 * c.num_heads * (a.qk_dim + a.v_dim) * keys
        return 6 * matmul + 3 * attention


class DecodeState:
    """What ``GPT.decode`` keeps between calls: the last tokens of the sequence, as many as the
    next call can depend on."""

    def __init__(self):
        self.tokens = None

    def extend(self, inputs: Tensor, keep: int, block: int) -> Tensor:
        """Add ``inputs``; drop whole blocks of tokens from the front while more than ``keep``
        stay before the new ones. Returns the tokens held."""
        tokens = inputs if self.tokens is None else torch.cat([self.tokens, inputs])
        drop = max(0, tokens.numel() - inputs.numel() - keep) // block * block
        self.tokens = tokens[drop:]
        return self.tokens


def _bias(size: int, values: dict) -> Tensor:
    bias = torch.zeros(size)
    for index, value in values.items():
        bias[index] = value
    return bias


def _prefix_table(config: GPTConfig) -> Tensor | None:
    if not config.prefix_prediction:
        return None
    from data.prefix_table import build_prefix_table

    return torch.from_numpy(build_prefix_table(config.padded_vocab))
