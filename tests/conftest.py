"""Shared test set-up: offline tokenizer files, the repo on sys.path, a tiny model config."""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
sys.path.insert(0, str(REPO_ROOT))
# One thread for every test process and the processes they start: the tests' shapes are tiny,
# and a second OpenMP thread only waits at every op's barrier, for whole time slices when the
# other core is busy (10x slower steps seen with another process running).
os.environ.setdefault("OMP_NUM_THREADS", "1")
if (SHARED / "tiktoken").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str((SHARED / "tiktoken").resolve()))


@pytest.fixture
def gpt2():
    """tiktoken's GPT-2 encoding; skipped offline without the shared tokenizer files."""
    tiktoken = pytest.importorskip("tiktoken")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:
        pytest.skip(f"tiktoken gpt2 encoding unavailable: {exc}")


@pytest.fixture
def tiny_model_config():
    """Record #89's 11-layer model with every piece, at width 32, for CPU tests."""
    return tiny_gpt_config()


def tiny_gpt_config():
    import run

    config = run.load_config(REPO_ROOT / "config" / "record89.py")["model_config"]
    return dict(config, model_dim=32, num_heads=2, head_dim=16, ffn_dim=64, block_size=16,
                dc_window=14, bigram_rows=512, bigram_sign_rows=32, gate_hidden=8,
                mudd_hidden=8, prefix_prediction=False, fp8_lm_head=False, fp8_mlp=False,
                fused_mlp=False)


@pytest.fixture
def tiny_record92_config():
    return tiny_record92_model_config()


def tiny_record92_model_config():
    """Record #92's model (config/record92.py: narrow Q/K, halved V/O, attention-free and
    removed layers, the parallel MLP, the grouped final mix, the n-gram table) at width 32."""
    import run

    config = run.load_config(REPO_ROOT / "config" / "record92.py")["model_config"]
    tiny = tiny_gpt_config()
    return dict(config, **{key: tiny[key] for key in (
        "model_dim", "num_heads", "head_dim", "ffn_dim", "block_size", "dc_window", "bigram_rows",
        "bigram_sign_rows", "gate_hidden", "mudd_hidden", "prefix_prediction", "fp8_lm_head",
        "fp8_mlp", "fused_mlp")}, short_qk_dim=8, final_mix_groups=2, ngram_bf16=False,
                fp8_attn=False)


@pytest.fixture
def record55_model_config():
    """Record #55's model: 4 layers with every trick switched on, small enough for CPU tests."""
    return dict(
        architecture="record55",
        vocab_size=50257, vocab_multiple=128, num_layers=4, model_dim=64, num_heads=2,
        head_dim=32, ffn_dim=128, activation="relu2", block_size=16, window_pattern="SL-L",
        attn_scale=0.12, rope_base=1024.0, rope_fraction=0.5, yarn_alpha=1.0, yarn_beta=32.0,
        yarn_attn_factor=0.2, value_embed_layers=((0, 3),), attn_gate=True, smear_gate=True,
        skip_connections=((0, 3),), backout_layer=1, residual_init=1.1, x0_init=0.0,
        skip_lambda_init=-1.5, backout_init=0.5, logit_softcap=23.0, softcap_form="sigmoid",
        softcap_shift=5.0, softcap_temp=7.5, fp8_lm_head=False, fp8_mlp=False,
        init_std=0.5, lm_head_init_std=0.005)


@pytest.fixture
def optimizer_config():
    """config/record89.py's optimizer_config, a fresh copy."""
    import run

    return run.load_config(REPO_ROOT / "config" / "record89.py")["optimizer_config"]


def gpt_config(model_config):
    """A model_config dict as the typed config its model takes."""
    from model import model_config as typed

    return typed(model_config)


def make_gpt(model_config):
    from model import build_model

    return build_model(gpt_config(model_config))


def make_model(config, short=1, long=2, seed=0, randomize=True):
    """A tiny model whose zero-initialised parts are randomised, so every path carries signal."""
    import torch  # here: the module sets OMP_NUM_THREADS before torch is first imported

    torch.manual_seed(seed)
    gpt = make_gpt(config)
    gpt.yarn.set_windows((short, long))
    if randomize:
        with torch.no_grad():
            for p in gpt.parameters():
                if p is not gpt.embed:  # a tied model's embedding is its lm_head
                    p.add_(torch.randn_like(p) * (0.3 if p.ndim < 2 else 0.05))
        gpt.tie.sync()
    return gpt


def tokens(n, doc_starts=(0,), seed=1):
    """n random token ids with BOS at ``doc_starts``."""
    import torch

    from data.shards import BOS_ID

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50000, (n,), generator=g)
    x[list(doc_starts)] = BOS_ID
    return x
