"""Modded-nanogpt's record #92 (ANVIL2, 2026-08-30, commit fd1b14a5) on one GPU: its model
(mixed-width attention, attention-free and removed layers, the parallel MLP, the grouped final
mix), its schedule (1122 + 52 grown scheduled steps and 20 extension steps, 329M tokens,
documents of up to 3072 tokens attending in segments of 2560 from the third stage on, the
embedding tables' Adam every fourth step from step 336) with its third stage grown by 36 steps
more for the smaller n-gram table (1210 + 20 steps, 343M tokens), the ANVIL optimizer, the
sampled softmax, the four weight ships and the hashed n-gram table, on record #89's
(config/record89.py) keys. Its float8 attention projections are off: slower here (README,
Speed). config/base.py is this config.

Not here (README, Recipe): the n-gram table's full size (this one is a quarter of it) and the
record's CUDA graphs and fused kernels.
"""

import math

from config import record89

# Record #92's model: 7 of 11 layers attend (0, 1, 2, 3, 5, 8, 10), Q/K heads of 64 on the
# short-window layers and 128 on the long (3, 10), V/O halved on 1 and 8; layers 4 and 9 keep
# only their MLP, layer 7 is removed (its residual scales and x0 injection stay), layer 8 has a
# second MLP beside the first; MLPs of 2816; the final mix of ten states per group of 64
# channels. Its n-gram table enters before layer 0, in 1, 4, 5, 9 and the last layer's mix.
# The table: bigram and trigram channels, row-wise Adam, bf16 weights. The record's has
# 84,602,880 rows (121 GiB over 8 GPUs); a quarter of them fit one 80 GB GPU with the gradient
# kept as rows (training_config.ngram_row_grads; README, Speed).
model_config = dict(
    record89.model_config,
    window_pattern="SSSL-S--S-L",
    mlp_only_layers=(4, 9),
    removed_layers=(7,),
    parallel_mlp_layers=(8,),
    x0_layers=(0, 1, 2, 4, 5, 7),
    bigram_layers=(0, 1, 4, 5, 9),
    short_qk_dim=64,
    short_attn_scale=0.13,
    attn_scale=0.085,  # the long-window layers'
    half_vo_layers=(1, 8),
    final_mix_groups=12,
    value_embed_layers=((1,), (2,), (8,), (10,)),
    paired_head_layers=(0, 2, 5),
    xsa_layers=(1, 3),
    dc_layers=(),
    ffn_dim=2816,
    mlp_proj_lr_mul=2 * math.sqrt(2816 / 768),  # the record's c_proj: shape factor times 2
    fp8_delayed_scales=True,  # the float8 MLP's hidden activation and its gradient (README)
    ngram_table=True, ngram_bf16=True, bigram_rows=21_150_720, bigram_sign_rows=8192)
optimizer_config = dict(
    record89.optimizer_config,
    matrix_optimizer="anvil",
    label_lr_mul=dict(record89.optimizer_config["label_lr_mul"], value_embed=70.0,
                      bigram_embed=70.0),
)
training_config = dict(record89.training_config, run_name="record92", ngram_row_grads=True)


def grown_schedule(growth: int) -> dict:
    """The record's schedule with its third stage grown by ``growth`` steps beyond its own 52
    (its SCHEDULE_GROWTH_STEPS): the stages after it, the cooldown's start and end, the sampled
    softmax's later switches and the untie move with it, as in the record's code (tested against
    it at growths 0 and 36)."""
    third = 426 + growth  # 374 + the record's 52 + growth
    total = 320 + 361 + third + 67
    return dict(
        record89.schedule,
        num_scheduled_iterations=total,
        num_extension_iterations=20,
        stages=(
            dict(duration=320 / total, tokens=131_072, windows=(1, 3), lr_mul=1.0,
                 max_seq_len=896, mtp_weights=(1.0, 0.5, 0.25), mtp_weights_end=(1.0, 0.5, 0.0),
                 prefix_weight=0.25),
            dict(duration=361 / total, tokens=262_144, windows=(3, 7), lr_mul=1.52,
                 mtp_weights=(1.0, 0.5), mtp_weights_end=(1.0, 0.0), prefix_weight=0.20,
                 prefix_weight_end=0.0, prefix_weight_levels=4),
            dict(duration=third / total, tokens=393_216, windows=(5, 11), lr_mul=1.73,
                 max_seq_len=3072),
            dict(duration=67 / total, tokens=327_680, windows=(5, 11),
                 lr_mul=1.73 * math.sqrt(20 / 24), max_seq_len=3072),
            dict(tokens=131_072, windows=(6, 13), lr_mul=1.0, max_seq_len=3072),
        ),
        attention_segment_cap=2560,  # documents of up to 3072 tokens attend in pieces of 2560
        # the cooldown from the record's int(total x (1 - 0.8)) (step 234 of 1174) to the end
        cooldown_frac=(total - int(total * (1 - 0.8))) / total,
        final_lr_ratio=0.30,
        momentum_peak=0.93,
        momentum_warmup_steps=240,
        untie_step=total + 2,  # the last tied update is the extension's first odd step
        table_adam_every=4,  # the value embeddings and the bigram table: Adam on steps 3 mod 4
        table_adam_from=336,
        tail_ema_window=298,
        tail_average_window=250,
        bank_blend_window=298,
        # 24,576 candidates from two thirds into the third stage, the full softmax from the taper
        sampled_softmax=((0, 10240), (681, 14336), (681 + -(-2 * third // 3), 24576),
                         (681 + third, 0)),
    )


# The record's stages after its growth: 320 / 361 / 426 (374 + 52) / 67 of the 1174 scheduled
# steps, the last of them the batch taper (20 of 24 units, lr x sqrt(20/24)); then 20 extension
# steps at 131,072 tokens. Grown here by 36 steps more for the quarter-size n-gram table (the
# record's exchange rates: README, Steps and the table's size).
schedule = grown_schedule(36)
data_config = record89.data_config
logging_config = record89.logging_config
compile_config = record89.compile_config
