"""config/record92.py's model at config/cpu.py's sizes with every other piece of it, on two
CPU cores in about a minute: record #92's schedule shape over 60 + 4 steps (the grown third
stage, the batch taper, the extension's untie), ANVIL (its rails engaging at step 26), the
sampled softmax until step 48, the four weight ships, the embedding tables' Adam every fourth
step from step 16, documents of 384 tokens attending in segments of 320, and the n-gram table
in bf16. Its losses say nothing about a GPU run; it checks that every piece runs together.
"""

import math

from config import cpu, record92

# record92.py's model at cpu.py's sizes: Q/K heads of 32 on the short-window layers (half the
# heads' 64, as the record's 64 of 128), the final mix per group of 64 channels as the record's
model_config = dict(record92.model_config,
                    **{key: cpu.model_config[key] for key in (
                        "model_dim", "num_heads", "head_dim", "ffn_dim", "block_size", "dc_window",
                        "gate_hidden", "mudd_hidden")},
                    short_qk_dim=32, final_mix_groups=2, bigram_rows=16384, bigram_sign_rows=256,
                    mlp_proj_lr_mul=2 * math.sqrt(512 / 128))
optimizer_config = dict(record92.optimizer_config,
                        anvil=dict(record92.optimizer_config["anvil"],
                                   engage_step=26))  # the record's 514 of 1194
training_config = dict(cpu.training_config, run_name="cpu92", ngram_row_grads=True)
# record92.py's schedule with its step counts, lengths and windows scaled to cpu.py's
schedule = dict(
    record92.schedule,
    num_scheduled_iterations=60,
    num_extension_iterations=4,
    stages=(
        dict(duration=16 / 60, tokens=512, windows=(1, 2), lr_mul=1.0, max_seq_len=128,
             mtp_weights=(1.0, 0.5, 0.25), mtp_weights_end=(1.0, 0.5, 0.0), prefix_weight=0.25),
        dict(duration=18 / 60, tokens=1_024, windows=(1, 3), lr_mul=1.52,
             mtp_weights=(1.0, 0.5), mtp_weights_end=(1.0, 0.0), prefix_weight=0.20,
             prefix_weight_end=0.0, prefix_weight_levels=4),
        dict(duration=22 / 60, tokens=1_024, windows=(2, 4), lr_mul=1.73, max_seq_len=384),
        dict(duration=4 / 60, tokens=1_024, windows=(2, 4), lr_mul=1.73 * math.sqrt(20 / 24),
             max_seq_len=384),
        dict(tokens=512, windows=(2, 4), lr_mul=1.0, max_seq_len=384),
    ),
    validation_windows=cpu.schedule["validation_windows"],
    split_frac=cpu.schedule["split_frac"],
    cooldown_frac=48 / 60,
    momentum_warmup_steps=12,
    momentum_cooldown_steps=cpu.schedule["momentum_cooldown_steps"],
    untie_step=62,
    table_adam_from=16,
    attention_segment_cap=320,
    tail_ema_window=16,
    tail_average_window=14,
    bank_blend_window=16,
    sampled_softmax=((0, 1024), (34, 2048), (48, 0)),
    sampled_softmax_rows=256,
)
data_config = cpu.data_config
logging_config = cpu.logging_config
compile_config = cpu.compile_config
