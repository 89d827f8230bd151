"""A minutes-long research config for one GPU: 8 layers, width 512, ~600 steps.

Same recipe as config/base.py at a third of the model and a fifth of the steps, for comparing
ideas quickly; it does not reach the 3.28 target.
"""

from config import base

model_config = dict(
    base.model_config,
    num_layers=8,
    model_dim=512,
    num_heads=4,
    ffn_dim=2048,
    window_pattern="SSLS-SSL",
    value_embed_layers=((0, 6), (1, 7)),
    skip_connections=((2, 4),),
    backout_layer=5,
)
optimizer_config = base.optimizer_config
training_config = dict(
    base.training_config,
    run_name="small",
    batch_size_multiple=16,  # 32,768-token micro-batches
    val_tokens=2_097_152,
    val_loss_every=100,
)
schedule = dict(
    base.schedule,
    num_scheduled_iterations=600,
    num_extension_iterations=20,
    stages=(
        dict(duration=1 / 3, tokens=65_536, windows=(1, 3), lr_mul=1.0),
        dict(duration=1 / 3, tokens=131_072, windows=(3, 7), lr_mul=1.52),
        dict(duration=1 / 3, tokens=196_608, windows=(5, 11), lr_mul=1.73),
        dict(tokens=196_608, windows=(6, 13), lr_mul=1.73),
    ),
    momentum_warmup_steps=100,
    momentum_cooldown_steps=20,
    freeze_scalars_steps=10,
)
data_config = base.data_config
logging_config = base.logging_config
compile_config = base.compile_config
