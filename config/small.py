"""A minutes-long research config for one GPU: the speedrun's model at width 512, ~600 steps.

Same recipe as config/record89.py at about a third of the model and half the steps, for comparing
ideas quickly; it does not reach the 3.28 target.
"""

from config import record89

model_config = dict(
    record89.model_config,
    model_dim=512,
    num_heads=4,
    ffn_dim=2048,
)
optimizer_config = record89.optimizer_config
training_config = dict(
    record89.training_config,
    run_name="small",
    batch_size_multiple=16,  # 32,768-token micro-batches
    val_tokens=2_097_152,
    val_loss_every=100,
)
schedule = dict(
    record89.schedule,
    num_scheduled_iterations=600,
    num_extension_iterations=15,
    stages=(
        dict(record89.schedule["stages"][0], tokens=65_536),
        dict(record89.schedule["stages"][1], tokens=131_072),
        dict(record89.schedule["stages"][2], tokens=196_608),
        dict(record89.schedule["stages"][3], tokens=196_608),
    ),
    momentum_warmup_steps=100,
    momentum_cooldown_steps=20,
    split_frac=402 / 600,  # after the last stage's first Adam step (401), as the record
)
data_config = record89.data_config
logging_config = record89.logging_config
compile_config = record89.compile_config
