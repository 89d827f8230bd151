"""Sample text from a trained model, as nanoGPT's sample.py does, streamed as it is generated.

    uv run sample.py checkpoints/base_1a2b3c4d_model.safetensors --prompt "The meaning of life"
    uv run sample.py CHECKPOINT --num_samples 3 --max_new_tokens 200 --temperature 0.8 --top_k 200

PATH is the model a full run writes or any checkpoint (``checkpoints.load_model``: the model at
the final validation's attention windows). The prompt follows a BOS, as every training document
does. A sample ends after ``--max_new_tokens`` tokens or where the model writes <|endoftext|>.
Each token is one ``decode`` step of the model, whose cost does not grow with the length of the
text: record #89's GPT runs its forward pass again over the tokens within its receptive field
(``model.GPT.decode``); record #55's attends to the keys and values its attention layers cached,
within their windows (``model_record55.GPT55.decode``).
"""

import argparse
import codecs
import sys
from pathlib import Path

import torch

from data.shards import BOS_ID

EXIT_USAGE = 2


def sample_token(logits, temperature: float, top_k: int | None, generator) -> int:
    """A token id drawn from softmax(logits / temperature), among the ``top_k`` likeliest."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def generate(model, prompt: list[int], max_new_tokens: int, temperature: float,
             top_k: int | None, generator):
    """Yield the sampled token ids one by one, as they are drawn; stops after BOS."""
    device = model.lm_head.device
    state = model.start_decoding()
    logits = model.decode(torch.tensor(prompt, device=device), state)[-1]
    for left in reversed(range(max_new_tokens)):
        token = sample_token(logits, temperature, top_k, generator)
        yield token
        if token == BOS_ID or not left:
            return
        logits = model.decode(torch.tensor([token], device=device), state)[-1]


class TextStream:
    """Token ids to text as they come: a character split across tokens is printed once its
    last byte is in."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        if token == BOS_ID:  # the end of the text, not text
            return self.decoder.decode(b"", final=True)
        return self.decoder.decode(self.encoding.decode_single_token_bytes(token))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a model (checkpoints/*_model.safetensors) or checkpoint")
    parser.add_argument("--prompt", default="", help="text to continue (default: none)")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="> 0; lower is more conservative")
    parser.add_argument("--top_k", type=int, default=200,
                        help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when there is a GPU")
    return parser


def check_arguments(args):
    """The first problem with the command line, or None."""
    if not Path(args.path).is_file():
        return f"no model or checkpoint file at {args.path}"
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}"
    if not args.temperature > 0:
        return f"--temperature must be > 0, got {args.temperature}"
    if args.top_k < 0:
        return f"--top_k must be >= 0 (0: all tokens), got {args.top_k}"
    if not 0 <= args.seed < 2**63:
        return f"--seed must be in [0, 2**63), got {args.seed}"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA GPU was found (use --device cpu)"
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_arguments(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    import tiktoken

    from checkpoints import CheckpointError, load_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, _ = load_model(args.path, device)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        encoding = tiktoken.get_encoding("gpt2")
    except Exception as exc:  # its files are downloaded on first use, then cached
        print(f"error: tiktoken's gpt2 tokenizer is unavailable ({type(exc).__name__}): it "
              "downloads its files once; offline, set TIKTOKEN_CACHE_DIR to a folder that "
              "holds them", file=sys.stderr)
        return EXIT_USAGE
    prompt = [BOS_ID, *encoding.encode_ordinary(args.prompt)]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for _ in range(args.num_samples):
        stream = TextStream(encoding)
        print(args.prompt, end="", flush=True)
        for token in generate(model, prompt, args.max_new_tokens, args.temperature,
                              args.top_k or None, generator):
            print(stream.add(token), end="", flush=True)
        print(stream.add(BOS_ID))
        print("-" * 40, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
