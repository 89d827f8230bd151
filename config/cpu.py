"""A tiny model that trains for real on two CPU cores in about a minute.

For newcomers and the smoke test (``--early_stop_steps 10 --seed 123``). Same code paths as the
speedrun, except attention, which runs through scaled_dot_product_attention with the
equivalent dense mask (FlexAttention has no backward pass on the CPU), and no compile.
"""

from config import base

model_config = dict(
    base.model_config,
    num_layers=4,
    model_dim=128,
    num_heads=2,
    head_dim=64,
    ffn_dim=512,
    block_size=64,
    window_pattern="SL-L",
    value_embed_layers=((0, 3),),
    skip_connections=((0, 3),),
    backout_layer=1,
)
optimizer_config = base.optimizer_config
training_config = dict(
    base.training_config,
    device="cpu",
    run_name="cpu",
    max_seq_len=256,
    batch_size_multiple=2,  # 512-token micro-batches
    val_tokens=8_192,
    val_loss_every=20,
    target_val_loss=7.3,  # a tiny model on the proxy corpus; not comparable with 3.28
)
schedule = dict(
    base.schedule,
    num_scheduled_iterations=60,
    num_extension_iterations=4,
    stages=(
        dict(duration=1 / 3, tokens=512, windows=(1, 2), lr_mul=1.0),
        dict(duration=1 / 3, tokens=1_024, windows=(1, 3), lr_mul=1.52),
        dict(duration=1 / 3, tokens=1_024, windows=(2, 4), lr_mul=1.73),
        dict(tokens=1_024, windows=(2, 4), lr_mul=1.73),
    ),
    validation_windows=(2, 4),
    momentum_warmup_steps=15,
    momentum_cooldown_steps=4,
    freeze_scalars_steps=5,
)
data_config = base.data_config
logging_config = dict(base.logging_config, wandb=False)
compile_config = dict(base.compile_config, enabled=False)
