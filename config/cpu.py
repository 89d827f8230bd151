"""A tiny model that trains for real on two CPU cores in a few minutes.

For newcomers and the smoke test (``--early_stop_steps 10 --seed 123``). The speedrun's model
(record #89's 11 layers and every piece of them) at width 128, and its schedule's shape over 60
+ 4 steps. Same code paths as the speedrun, except attention, which runs through
scaled_dot_product_attention with the equivalent dense mask (FlexAttention has no backward
pass on the CPU), and no compile.
"""

from config import record89

model_config = dict(
    record89.model_config,
    model_dim=128,
    num_heads=2,
    head_dim=64,
    ffn_dim=512,
    block_size=64,
    dc_window=32,
    bigram_rows=8192,
    bigram_sign_rows=256,
    gate_hidden=16,
    mudd_hidden=16,
)
optimizer_config = record89.optimizer_config
training_config = dict(
    record89.training_config,
    device="cpu",
    run_name="cpu",
    max_seq_len=256,
    batch_size_multiple=2,  # 512-token micro-batches
    val_tokens=8_192,
    val_chunk_tokens=512,
    val_loss_every=20,
    target_val_loss=7.3,  # a tiny model on the proxy corpus; not comparable with 3.28
)
schedule = dict(
    record89.schedule,
    num_scheduled_iterations=60,
    num_extension_iterations=4,
    stages=(
        dict(duration=1 / 3, tokens=512, windows=(1, 2), lr_mul=1.0, max_seq_len=128,
             mtp_weights=(1.0, 0.5, 0.25), mtp_weights_end=(1.0, 0.5, 0.0), prefix_weight=0.25),
        dict(duration=1 / 3, tokens=1_024, windows=(1, 3), lr_mul=1.52,
             mtp_weights=(1.0, 0.5), mtp_weights_end=(1.0, 0.0), prefix_weight=0.25,
             prefix_weight_end=0.0),
        dict(duration=1 / 3, tokens=1_024, windows=(2, 4), lr_mul=1.73),
        dict(tokens=1_024, windows=(2, 4), lr_mul=1.0),
    ),
    validation_windows=(2, 4),
    momentum_warmup_steps=15,
    momentum_cooldown_steps=4,
    split_frac=42 / 60,  # after the last stage's first Adam step (41), as the record
)
data_config = record89.data_config
logging_config = dict(record89.logging_config, wandb=False)
compile_config = dict(record89.compile_config, enabled=False)
