"""Modded-nanogpt's record #89 (2026-07-17, commit 57a65f15) on one GPU, 1270 + 15 steps and
339M tokens to FineWeb val loss 3.28: the recipe for cards with less than 80 GB (from 24 GB,
the micro-batch fitted to the card), and the one every other config builds on.

The model is ``model.py`` (README, Recipe: each piece, its record and config key); the
schedule is the record's stage table. Every key of every section is here and read by the
code; config/record92.py (and so config/base.py), config/small.py and config/cpu.py build on
this file and change some. config/record55.py is the recipe before it, to compare.
"""

import math

model_config = dict(
    architecture="record89",
    vocab_size=50257,
    vocab_multiple=128,  # 50304: matmul-friendly
    num_layers=11,
    model_dim=768,
    num_heads=6,
    head_dim=128,
    ffn_dim=3072,
    activation="relu2",
    block_size=128,
    # S short window, L long window, - no attention (layer 6 adds layer 3's output instead)
    window_pattern="SSSLSS-SSSL",
    attn_scale=0.1,
    rope_base=1024.0,
    rope_fraction=0.5,
    yarn_alpha=1.0,
    yarn_beta=32.0,
    yarn_attn_factor=0.2,
    value_embed_layers=((1,), (2,), (8,), (9,), (10,)),  # five untied tables (#209)
    value_embed_init_std=0.01,
    paired_head_layers=(0, 2, 5, 9),  # #191
    xsa_layers=(1, 3, 4, 7),  # #264, #317
    attn_gate_layers=(3, 10),
    dc_layers=(10,),  # #315
    dc_window=112,
    # record #92's layer roles and widths (config/record92.py), off here: layers without
    # attention that keep only the MLP or nothing, parallel MLPs; where x0 and the bigram
    # embedding enter (0: the bigram embedding before the first layer); narrow Q/K on the
    # short-window layers, half-width V/O; the final mix per channel group
    mlp_only_layers=(),
    removed_layers=(),
    parallel_mlp_layers=(),
    x0_layers=(0, 1, 2, 3, 4, 5, 7, 8, 9),
    bigram_layers=(0, 1, 2, 3, 4, 5, 7, 8, 9),
    short_qk_dim=0,
    short_attn_scale=0.0,
    half_vo_layers=(),
    final_mix_groups=0,
    key_offset=True,
    bigram_rows=50304 * 15 // 2,  # #201
    bigram_sign_rows=8192,  # #299
    ngram_table=False,  # record #92's bigram + trigram table in its place (layers/ngram.py)
    gate_hidden=64,  # MUDD gates (#315)
    mudd_hidden=64,  # MUDD dense connections (#259)
    post_gate_layer=4,
    shared_input_layer=7,  # layers 8-10 attend from layer 7's output (#230, #241)
    skip_source=3,
    residual_init=math.sqrt(1.1),
    skip_lambda_init=-1.5,
    logit_softcap=23.0,
    softcap_form="sigmoid",
    softcap_shift=5.0,
    softcap_temp=7.5,
    prefix_prediction=True,  # #337; the prefix table comes from tiktoken's GPT-2 vocabulary
    # the lm_head + softcap + cross-entropy op's matmuls in float8 where the GPU has them
    # (capability >= 8.9, else bf16): faster, at some accuracy (README, Speed, gives both)
    fp8_lm_head=True,
    # the MLP's matmuls in float8 too (kernels.linear, same guard, dynamic per-tensor scales)
    fp8_mlp=True,
    # the attention's Q, K, V and output projections likewise (record #92's FP8 QKV); off
    # until measured on the GPU
    fp8_attn=False,
    # ... by record #89's relu^2 MLP kernels instead (kernels.relu2_mlp: float8 forward, relu^2
    # in the up projection's epilogue, the hidden activation's scale from the previous call,
    # bf16 backward)
    fused_mlp=False,
    # relu2 with fp8_mlp, not fused_mlp: the hidden activation and its gradient cast at record
    # #92's delayed scales (the previous step's amax with headroom) by one kernel each
    # (kernels.float8_relu2_mlp), without the amax passes over them: record #92's, on in
    # config/record92.py
    fp8_delayed_scales=False,
    init_std=0.5,
    lm_head_init_std=0.005,
    mlp_proj_lr_mul=4.0,  # the record's c_proj: a shape factor of 2 and its own 2
)

# The record's param_table: Adam's lr 0.008, eps 1e-10 and weight decay 0.005 for every Adam
# parameter, times the label's lr and decay multipliers; NorMuon's lr 0.023 and decay 1.2.
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
    label_lr_mul=dict(embed=1.0, lm_head=1.0, value_embed=75.0, bigram_embed=75.0, attn=1.0,
                      mlp=1.0, scalar=5.0, resid_lambda=5.0, post_lambda=1.0, gate=1.0,
                      mudd=0.25, mudd_gate=0.1),
    label_wd_mul=dict(embed=150.0, lm_head=150.0, value_embed=5.0, bigram_embed=5.0, attn=1.0,
                      mlp=1.0, scalar=0.0, resid_lambda=0.0, post_lambda=0.0, gate=1.0,
                      mudd=1.0, mudd_gate=1.0),
    label_betas=dict(value_embed=(0.75, 0.95), bigram_embed=(0.75, 0.95),
                     resid_lambda=(0.9, 0.95), post_lambda=(0.9, 0.95)),
)

training_config = dict(
    device="cuda",
    seed=0,
    run_name="record89",
    max_seq_len=2048,  # longest segment (document head) in a packed micro-batch
    batch_size_multiple=32,  # micro-batch = 32 x 2048 = 65,536 tokens; env BATCH_SIZE_MULTIPLE
    val_tokens=10_485_760,
    val_chunk_tokens=262_144,  # validation reads val_tokens in chunks of this, as the record
    # the record's gradient: the sum over a step's tokens of their losses' gradients / 8 (the
    # sum of its 8 GPUs' micro-batches, averaged); None would be the mean over the tokens
    sum_loss_scale=1 / 8,
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
    # the embedding tables' gradients added in place (layers/embeddings.py); off until its
    # speed is measured on the GPU (README, Speed)
    table_grads_in_place=False,
    # the n-gram table's gradient as (row, gradient) pairs (layers/ngram.py; needs ngram_table)
    ngram_row_grads=False,
)

# The record's TRAINING_STAGES: each row takes its duration (share) of the scheduled
# iterations, with its tokens per optimizer step, (short, long) attention windows in 128-token
# blocks, lr multiplier, longest training segment, and the loss weights of the next tokens
# (MTP) and of the next token's prefix token, which move linearly to their _end values over
# the stage (prefix_weight_levels n: the prefix weight in n equal steps, record #92). The last
# row, without a duration, holds for the extension iterations. Micro-batches of 65,536 tokens
# (2, 4, 6 a step) where the record takes 8 of 16,384 / 32,768 / 49,152: the same tokens and
# gradient, summed in another order.
schedule = dict(
    num_scheduled_iterations=1270,
    num_extension_iterations=15,
    stages=(
        dict(duration=1 / 3, tokens=131_072, windows=(1, 3), lr_mul=1.0, max_seq_len=896,
             mtp_weights=(1.0, 0.5, 0.25), mtp_weights_end=(1.0, 0.5, 0.0), prefix_weight=0.25),
        dict(duration=1 / 3, tokens=262_144, windows=(3, 7), lr_mul=1.52,
             mtp_weights=(1.0, 0.5), mtp_weights_end=(1.0, 0.0), prefix_weight=0.25,
             prefix_weight_end=0.0),
        dict(duration=1 / 3, tokens=393_216, windows=(5, 11), lr_mul=1.73),
        dict(tokens=393_216, windows=(6, 13), lr_mul=1.0),
    ),
    validation_windows=(6, 20),  # the final validation's, without YaRN
    warmup_steps=0,
    cooldown_frac=0.6,  # from step 508
    final_lr_ratio=0.15,  # the lr floor (#224)
    final_lr_absolute=True,  # 0.15 itself, from every stage's lr_mul
    momentum_start=0.85,  # matrix optimizer momentum: 0.85 -> 0.95 -> 0.85
    momentum_peak=0.95,
    momentum_end=0.85,
    momentum_warmup_steps=300,
    momentum_cooldown_steps=50,
    # The record's last tied update is step 847 (stage 3's first odd step); the embedding has
    # its own gradient from step 848 on.
    split_frac=848 / 1270,
    untie_step=None,  # or the first untied step itself (record #92: 1176, in its extension)
    freeze_scalars_steps=0,
    adam_every=2,  # Adam on odd steps, on the gradients of two steps
    # record #92's TailEMA of the lm_head and embedding (averaging.py; 298 steps blended
    # 0.65 there): off until measured on this recipe
    tail_ema_window=0,
    tail_ema_blend=0.65,
    # record #92's other ships (averaging.py): its windows are 250 and 298 of 1194 steps
    tail_average_window=0,
    bank_blend_window=0,
    bank_blend=0.55,
    bank_blend_correction=0.2007,
    # record #92's sampled softmax (layers/sampled.py): ((first step, candidates), ...) and
    # the rows that share a set; its own is ((0, 10240), (681, 14336), (965, 24576), (1107, 0))
    # over 1194 steps. Off until measured on this recipe
    sampled_softmax=(),
    sampled_softmax_rows=16384,
    # record #92's other schedule pieces (config/record92.py has them on): the embedding tables'
    # Adam on every n-th step from a step on (its 4 from 336), and attention within segments of
    # at most this many tokens of a document (its 2560, with stages' max_seq_len 3072)
    table_adam_every=0,
    table_adam_from=0,
    attention_segment_cap=0,
)

data_config = dict(
    train_pattern="data/fineweb10B/fineweb_train_*.bin",  # env DATA_PATH=folder overrides both
    val_pattern="data/fineweb10B/fineweb_val_*.bin",
    num_train_shards=8,  # downloaded on first run when the default folder is empty
    prefetch=True,  # prepare batches in a background thread
    # documents packed in stream order, as the record (N > 0: best fit among the next N; on
    # config/cpu.py's 64 steps in order gave 0.013 and 0.019 lower val loss at 2 seeds)
    packing_lookahead=0,
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
