"""OpenAI's GPT-2 in plain PyTorch: the model the speedrun's target was set from.

The speedrun's target, FineWeb val loss 3.28, is what GPT-2 124M reaches (llm.c); ``evaluate.py
--gpt2`` measures it on the same val tokens and HellaSwag as a trained model. This is the
textbook model (learned positions up to 1024, pre-LayerNorm blocks, GELU with the tanh
approximation, the lm_head tied to the token embedding), loaded from the safetensors weights
of a Hugging Face repository (``openai-community/gpt2``) or a local folder of the same files:
``config.json`` and ``model.safetensors``, whose projection weights are stored (in, out), as
the original Conv1D layers keep them.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_SOURCE = "openai-community/gpt2"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True)
class GPT2Config:
    """The keys of a Hugging Face GPT-2 ``config.json`` that the model reads."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5


class Attention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(D, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, idx):
        """idx (B, T) token ids, each row a text from its first token; returns (B, T, vocab)
        logits."""
        if idx.size(1) > self.config.n_positions:
            raise ValueError(f"GPT-2 reads at most {self.config.n_positions} tokens, got "
                             f"{idx.size(1)}")
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


def load_gpt2(source=DEFAULT_SOURCE, device="cpu") -> GPT2:
    """GPT-2 from a local folder, or else a Hugging Face repository (downloaded once into the
    Hugging Face cache), holding config.json and model.safetensors."""
    from safetensors.torch import load_file

    folder = Path(source)
    if folder.is_dir():
        files = [folder / "config.json", folder / "model.safetensors"]
    else:
        from huggingface_hub import hf_hub_download

        files = [Path(hf_hub_download(source, name)) for name in ("config.json",
                                                                    "model.safetensors")]
    settings = json.loads(files[0].read_text())
    config = GPT2Config(**{key: settings[key] for key in GPT2Config.__dataclass_fields__
                           if key in settings})
    model = GPT2(config)
    state = {}
    for name, tensor in load_file(files[1]).items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) and tensor.ndim != 1:
            continue  # the causal-mask buffers some files carry; SDPA is causal by itself
        state[name] = tensor.T if name.endswith(CONV1D) else tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{files[1]} is no GPT-2 of this layout: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.to(device).eval()
