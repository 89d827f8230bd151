"""What this trainer has of modded-nanogpt's record #92 (ANVIL2, 2026-08-30, commit fd1b14a5):
its schedule (1122 + 52 grown scheduled steps and 20 extension steps, 329M tokens, documents
of up to 3072 tokens attending in segments of 2560 from the third stage on, the embedding
tables' Adam every fourth step from step 336), the ANVIL optimizer, the sampled softmax, the
four weight ships, the hashed n-gram table (a twentieth of its size) and float8 attention
projections, on record #89's model.

Not yet here (README, Recipe): record #92's model (mixed-width attention, its removed layer,
three YaRN tables, where the n-gram table enters) and its n-gram table's full size. So this is
not record #92; it is config/base.py with every piece of record #92 that is ported, to compare
with it.
"""

import math

from config import base

# Record #92's n-gram table in the bigram table's place (bigram and trigram channels, row-wise
# Adam, bf16 weights). The record's has 84,602,880 rows (121 GiB over 8 GPUs); with this
# trainer's dense gradients 4,194,304 rows fit one 80 GB GPU by memory.py's estimate (55.2 GB
# at the full micro-batch, the table's micro-batch gradient included; not yet measured).
model_config = dict(base.model_config, ngram_table=True, ngram_bf16=True,
                    bigram_rows=4_194_304, bigram_sign_rows=8192,
                    fp8_attn=True)  # its QKV in float8 too
optimizer_config = dict(
    base.optimizer_config,
    matrix_optimizer="anvil",
    label_lr_mul=dict(base.optimizer_config["label_lr_mul"], value_embed=70.0,
                      bigram_embed=70.0),
)
training_config = dict(base.training_config, run_name="record92")

# The record's TRAINING_STAGES after its growth: 320 / 361 / 426 (374 + 52) / 67 of the 1174
# scheduled steps, the last of them the batch taper (20 of 24 units, lr x sqrt(20/24)); then
# 20 extension steps at 131,072 tokens.
schedule = dict(
    base.schedule,
    num_scheduled_iterations=1174,
    num_extension_iterations=20,
    stages=(
        dict(duration=320 / 1174, tokens=131_072, windows=(1, 3), lr_mul=1.0, max_seq_len=896,
             mtp_weights=(1.0, 0.5, 0.25), mtp_weights_end=(1.0, 0.5, 0.0), prefix_weight=0.25),
        dict(duration=361 / 1174, tokens=262_144, windows=(3, 7), lr_mul=1.52,
             mtp_weights=(1.0, 0.5), mtp_weights_end=(1.0, 0.0), prefix_weight=0.20,
             prefix_weight_end=0.0, prefix_weight_levels=4),
        dict(duration=426 / 1174, tokens=393_216, windows=(5, 11), lr_mul=1.73,
             max_seq_len=3072),
        dict(duration=67 / 1174, tokens=327_680, windows=(5, 11),
             lr_mul=1.73 * math.sqrt(20 / 24), max_seq_len=3072),
        dict(tokens=131_072, windows=(6, 13), lr_mul=1.0, max_seq_len=3072),
    ),
    attention_segment_cap=2560,  # documents of up to 3072 tokens attend in pieces of 2560
    cooldown_frac=940 / 1174,  # from step 234 (the record's int(1174 x 0.2)) to step 1174
    final_lr_ratio=0.30,
    momentum_peak=0.93,
    momentum_warmup_steps=240,
    untie_step=1176,  # its last tied update is step 1175 (the extension's first odd step)
    table_adam_every=4,  # the value embeddings and the bigram table: Adam on steps 3 mod 4
    table_adam_from=336,
    tail_ema_window=298,
    tail_average_window=250,
    bank_blend_window=298,
    sampled_softmax=((0, 10240), (681, 14336), (965, 24576), (1107, 0)),
)
data_config = base.data_config
logging_config = base.logging_config
compile_config = base.compile_config
