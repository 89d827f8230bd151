"""The previous recipe: modded-nanogpt's record #55 (December 2025) on one 80 GB GPU, 1805 + 40
steps and 489M tokens, the model of ``model_record55.py``.

Kept to compare with config/record89.py (record #89) side by side: 11 layers, width 768, value
embeddings, gates, skip and backout, YaRN windows counted in blocks, NorMuon with Polar
Express, three batch-size stages, next-token prediction only.
"""

model_config = dict(
    architecture="record55",
    vocab_size=50257,
    vocab_multiple=128,  # 50304: matmul-friendly
    num_layers=11,
    model_dim=768,
    num_heads=6,
    head_dim=128,
    ffn_dim=3072,
    activation="relu2",
    block_size=128,
    # S short window, L long window, - no attention (layer 6 is MLP only)
    window_pattern="SSSLSS-SSSL",
    attn_scale=0.1,
    rope_base=1024.0,
    rope_fraction=0.5,
    yarn_alpha=1.0,
    yarn_beta=32.0,
    yarn_attn_factor=0.2,
    # table 0 on layer 8, table 1 on layers 0 and 9, table 2 on layers 1 and 10
    value_embed_layers=((8,), (0, 9), (1, 10)),
    attn_gate=True,
    smear_gate=True,
    skip_connections=((3, 6),),
    backout_layer=7,
    residual_init=1.1,
    x0_init=0.0,
    skip_lambda_init=-1.5,
    backout_init=0.5,
    logit_softcap=23.0,
    softcap_form="sigmoid",
    softcap_shift=5.0,
    softcap_temp=7.5,
    # the lm_head + softcap + cross-entropy op's matmuls in float8 where the GPU has them
    # (capability >= 8.9, else bf16): faster, at some accuracy (README, Speed, gives both)
    fp8_lm_head=True,
    # the MLP's matmuls in float8 too (kernels.linear, same guard, dynamic per-tensor scales)
    fp8_mlp=True,
    init_std=0.5,
    lm_head_init_std=0.005,
)

# Effective lr = group lr * schedule factor * label_lr_mul[label] * param.lr_mul; see
# optimizers.py for how weight decay is scaled.
optimizer_config = dict(
    matrix_optimizer="normuon",  # normuon | bam | aro | anvil
    adam=dict(lr=0.008, betas=(0.5, 0.95), eps=1e-10, weight_decay=0.005),
    scalar_adam=dict(lr=0.008, betas=(0.9, 0.99), eps=1e-10, weight_decay=0.005),
    normuon=dict(lr=0.023, momentum=0.95, beta2=0.9, weight_decay=1.2),
    # BAM's SinkNorm output has the Frobenius norm of a semi-orthogonal matrix, so NorMuon's
    # lr and decay carry over.
    bam=dict(lr=0.023, momentum=0.95, weight_decay=1.2),
    # ARO updates have RMS 0.2 instead of 1/sqrt(max(rows, cols)): lr 0.004 gives NorMuon's
    # per-entry step at width 768, and weight_decay 40 its per-step decay
    # (40 * 0.004**2 ~ 1.2 * 0.023**2). Untuned.
    aro=dict(lr=0.004, momentum=0.95, weight_decay=40.0, sinkhorn_iters=5, rms=0.2),
    # record #92's ANVIL: its lr and decay; the rails blend from its step 514 of 1194 (the
    # schedule's momentum, 0.85 to 0.95 here, stays the trainer's: the record's runs 0.85 to
    # 0.93 over 240 steps)
    anvil=dict(lr=0.023, momentum=0.95, beta2=0.9, weight_decay=2.25, slow_beta=0.98,
               fast_beta=0.85, fast_weight=0.4385, engage_step=514),
    label_lr_mul=dict(embed=1.0, lm_head=1.0, value_embed=75.0, attn=1.0, mlp=1.0, scalar=5.0,
                      gate=1.0),
    label_wd_mul=dict(embed=150.0, lm_head=150.0, value_embed=5.0, attn=1.0, mlp=1.0,
                      scalar=0.0, gate=1.0),
    label_betas=dict(value_embed=(0.75, 0.95)),
)

training_config = dict(
    device="cuda",
    seed=0,
    run_name="record55",
    max_seq_len=2048,  # longest segment (document head) in a packed micro-batch
    batch_size_multiple=32,  # micro-batch = 32 x 2048 = 65,536 tokens; env BATCH_SIZE_MULTIPLE
    val_tokens=10_485_760,
    val_chunk_tokens=262_144,  # validation reads val_tokens in chunks of this, as the record
    sum_loss_scale=None,  # None: the gradient of the mean loss over the step's tokens
    val_loss_every=250,  # 0: only at the end
    target_val_loss=3.28,
    early_stop_steps=None,  # --early_stop_steps N stops after N steps, the schedule unchanged
    grad_clip_norm=0.0,  # 0: off
    checkpoint_every=0,  # 0: off
    keep_checkpoints=2,  # the newest 2 of a run's checkpoints stay (0: all)
    checkpoint_dir="checkpoints",  # checkpoints and the final model (safetensors)
    save_on_interrupt=True,  # Ctrl-C or SIGTERM writes a checkpoint after the step and says where
    save_model=True,  # the trained model at the end of every full run
    records_dir="records",
    benchmark_steps=20,  # timed steps per stage in --benchmark mode
)

# The stage table: each row takes its duration (share) of the scheduled iterations, with its
# tokens per optimizer step, (short, long) attention windows in 128-token blocks and lr
# multiplier (larger batches take larger steps). Each growth of the long window applies YaRN.
# The last row, without a duration, holds for the extension iterations, at the final lr.
schedule = dict(
    num_scheduled_iterations=1805,
    num_extension_iterations=40,
    stages=(
        dict(duration=1 / 3, tokens=131_072, windows=(1, 3), lr_mul=1.0),
        dict(duration=1 / 3, tokens=262_144, windows=(3, 7), lr_mul=1.52),
        dict(duration=1 / 3, tokens=393_216, windows=(5, 11), lr_mul=1.73),
        dict(tokens=393_216, windows=(6, 13), lr_mul=1.73),
    ),
    validation_windows=(10, 20),  # the final validation extends the windows, without YaRN
    warmup_steps=0,
    cooldown_frac=0.5,  # linear decay over the last half of the scheduled iterations
    final_lr_ratio=0.1,
    final_lr_absolute=False,  # 0.1 x the stage's lr_mul
    momentum_start=0.85,  # matrix optimizer momentum: 0.85 -> 0.95 -> 0.85
    momentum_peak=0.95,
    momentum_end=0.85,
    momentum_warmup_steps=300,
    momentum_cooldown_steps=50,
    split_frac=2 / 3,  # untie embedding and lm_head at this share of the scheduled iterations
    freeze_scalars_steps=40,  # scalar Adam holds still this long when a stage begins
    adam_every=1,  # Adam steps every step
    tail_ema_window=0,  # averaging.py needs adam_every=2
    tail_ema_blend=0.65,
)

data_config = dict(
    train_pattern="data/fineweb10B/fineweb_train_*.bin",  # env DATA_PATH=folder overrides both
    val_pattern="data/fineweb10B/fineweb_val_*.bin",
    num_train_shards=8,  # downloaded on first run when the default folder is empty
    prefetch=True,  # prepare batches in a background thread
)

logging_config = dict(
    log_dir="logs",
    progress_bar=True,  # tqdm when stdout is a terminal
    wandb=True,  # online when logged in, offline otherwise; WANDB_MODE=disabled turns it off
    wandb_project="speedrun-gpt",
)

compile_config = dict(
    enabled=True,
    cache_dir=".cache",  # inductor and Triton caches, reused by the next run
    coordinate_descent_tuning=False,
)
