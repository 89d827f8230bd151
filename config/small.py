"""A minutes-long research config for one GPU: the speedrun's model at width 512, ~600 steps.

Same recipe as config/base.py at about a third of the model and half the steps, for comparing
ideas quickly; it does not reach the 3.28 target.
"""

from config import base

model_config = dict(
    base.model_config,
    model_dim=512,
    num_heads=4,
    ffn_dim=2048,
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
    num_extension_iterations=15,
    stages=(
        dict(base.schedule["stages"][0], tokens=65_536),
        dict(base.schedule["stages"][1], tokens=131_072),
        dict(base.schedule["stages"][2], tokens=196_608),
        dict(base.schedule["stages"][3], tokens=196_608),
    ),
    momentum_warmup_steps=100,
    momentum_cooldown_steps=20,
    split_frac=402 / 600,  # after the last stage's first Adam step (401), as the record
)
data_config = base.data_config
logging_config = base.logging_config
compile_config = base.compile_config
