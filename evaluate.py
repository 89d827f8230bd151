"""Evaluate a trained model: FineWeb val loss and HellaSwag accuracy; GPT-2 124M beside it.

    uv run evaluate.py checkpoints/base_1a2b3c4d_model.safetensors
    uv run evaluate.py --gpt2 --config config/base.py       # OpenAI's GPT-2 124M, same measures

* **Val loss**: the mean loss over the run's own val tokens, as the trainer's validation scores
  them (``data.loader.validation_pieces``: the first ``val_tokens`` of the val shards in chunks
  of ``val_chunk_tokens``; ``DATA_PATH`` points at other shards, as for run.py). A model file
  carries its run's config; ``--gpt2`` takes ``--config``'s and reads each document of a chunk
  in rows of at most its 1024-token context, each row from position 0.
* **HellaSwag** (validation, 10,042 examples): each example is a context and four endings;
  the prediction is the ending with the lowest mean loss per token given the context. Many
  examples are packed into one sequence, each (context + ending) its own document starting with
  BOS, so document masking keeps them apart (the speedrun's own HellaSwag evaluation packs
  likewise). Record #89's GPT reads a document's first token with the one before it (the smear
  gate, the bigram hash, the key offset), in training and here alike; record #55's and GPT-2
  score each ending exactly as alone. The examples are llm.c's tokenised file,
  ``hellaswag_val.bin`` of the ``karpathy/llmc-starter-pack`` dataset, downloaded with
  huggingface_hub on first use and cached; ``--hellaswag_file`` reads a local file of that
  format instead.
* **Canonical masking** (``--canonical_mask``, modded-nanogpt #350): the val loss once more,
  the logits of the tokens the tokenizer never emits after the previous token masked
  (``data/canonical_mask.py``); speedrun models only.

The loss of every token comes from float32 logits of the model's final hidden states, for the
trained model through its document-masked attention (compiled on a GPU, as in training) and
normalised over the padded vocabulary as its training loss is, for GPT-2 one document a row.
"""

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.canonical_mask import build_canonical_mask, mask_logits
from data.shards import BOS_ID

EXIT_USAGE = 2
HELLASWAG_REPO = "karpathy/llmc-starter-pack"
HELLASWAG_FILE = "hellaswag_val.bin"
HELLASWAG_EXAMPLES = 10_042
EVAL_MAGIC, EVAL_VERSION, EXAMPLE_START = 20240522, 1, 65535
LOGIT_ROWS = 8192  # rows of float32 logits at a time


class EvalError(ValueError):
    """Bad input to the evaluation (a file, an argument); the message says what to do."""


# ----------------------------------------------------------------------------------------------
# HellaSwag: llm.c's file, and packing


@dataclass(frozen=True)
class Example:
    context: list
    endings: list  # token lists, one per ending
    label: int


def read_hellaswag(path) -> list[Example]:
    """Examples of an llm.c eval file: a header of 256 int32 (magic 20240522, version 1, the
    number of examples), then per example the uint16s 65535, its size in bytes, its index, the
    label, the number of endings, the context's length and tokens, and each ending's length and
    tokens."""
    path = Path(path)
    header = np.fromfile(path, dtype="<i4", count=256)
    if header.size < 256 or (int(header[0]), int(header[1])) != (EVAL_MAGIC, EVAL_VERSION):
        raise EvalError(f"{path} is no llm.c eval file (magic {EVAL_MAGIC}, version "
                        f"{EVAL_VERSION} expected)")
    stream = np.fromfile(path, dtype="<u2", offset=1024).astype(np.int64)
    examples, at = [], 0
    for _ in range(int(header[2])):
        if at >= stream.size or stream[at] != EXAMPLE_START:
            raise EvalError(f"{path}: example {len(examples)} does not start where the one "
                            "before it ended (a truncated or corrupt file)")
        size, label, count = int(stream[at + 1]) // 2, int(stream[at + 3]), int(stream[at + 4])
        pieces, cursor = [], at + 5
        while len(pieces) < 1 + count and cursor < stream.size:
            length = int(stream[cursor])
            pieces.append(stream[cursor + 1:cursor + 1 + length].tolist())
            cursor += 1 + length
        if (len(pieces) != 1 + count or cursor != at + size or cursor > stream.size
                or not 0 <= label < count):
            raise EvalError(f"{path}: example {len(examples)} is malformed or cut short")
        examples.append(Example(pieces[0], pieces[1:], label))
        at = cursor
    return examples


def hellaswag_path(local=None) -> Path:
    """``local``, or llm.c's file from the Hugging Face Hub (its cache keeps it)."""
    if local is not None:
        if not Path(local).is_file():
            raise EvalError(f"--hellaswag_file: no file at {local}")
        return Path(local)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(HELLASWAG_REPO, HELLASWAG_FILE, repo_type="dataset"))
    except Exception as exc:  # offline, the hub unreachable, the file moved
        raise EvalError(f"HellaSwag download ({HELLASWAG_REPO}/{HELLASWAG_FILE}) failed: {exc}. "
                        "Pass --hellaswag_file with a local copy, or --skip_hellaswag") from exc


@dataclass
class PackedSequence:
    inputs: torch.Tensor  # (T,) int32
    targets: torch.Tensor  # (T,) int64
    spans: list  # per example, per ending: (start, end) of the ending's targets
    labels: list


def pack_hellaswag(examples: list[Example], seq_len: int) -> list[PackedSequence]:
    """Whole examples, each ending as the document BOS + context + ending, in sequences of
    ``seq_len`` tokens; the rest of a sequence is BOS tokens, one-token documents never scored.
    """
    sequences, inputs, targets, spans, labels = [], [], [], [], []

    def close():
        pad = seq_len - len(inputs)
        sequences.append(PackedSequence(
            torch.tensor(inputs + [BOS_ID] * pad, dtype=torch.int32),
            torch.tensor(targets + [BOS_ID] * pad, dtype=torch.int64), spans, labels))

    for example in examples:
        documents = [[BOS_ID, *example.context, *ending] for ending in example.endings]
        size = sum(len(d) - 1 for d in documents)
        if size > seq_len:
            raise EvalError(f"a HellaSwag example takes {size} tokens, more than a sequence of "
                            f"{seq_len}: raise --seq_len")
        if len(inputs) + size > seq_len:
            close()
            inputs, targets, spans, labels = [], [], [], []
        example_spans = []
        for document, ending in zip(documents, example.endings, strict=True):
            start = len(inputs) + len(example.context)  # the target of that input: ending[0]
            example_spans.append((start, start + len(ending)))
            inputs += document[:-1]
            targets += document[1:]
        spans.append(example_spans)
        labels.append(example.label)
    if inputs:
        close()
    return sequences


def hellaswag_accuracy(token_losses, sequences) -> tuple[int, int]:
    """(correct, total): an example is right when its labelled ending has the lowest mean
    loss per token."""
    correct = total = 0
    for sequence in sequences:
        spans = [span for example_spans in sequence.spans for span in example_spans]
        rows = torch.cat([torch.arange(a, b) for a, b in spans])
        losses = iter(token_losses(sequence.inputs, sequence.targets, rows).cpu().split(
            [b - a for a, b in spans]))
        for example_spans, label in zip(sequence.spans, sequence.labels, strict=True):
            means = torch.stack([next(losses).mean() for _ in example_spans])
            correct += int(means.argmin()) == label
            total += 1
    return correct, total


# ----------------------------------------------------------------------------------------------
# Per-token losses of each model


def cross_entropy_rows(hidden, targets, logits_of, previous=None, table=None):
    """Loss of each row of ``hidden`` (T, D), LOGIT_ROWS rows of float32 logits at a time; 0
    where the target is -1 (not scored). With a canonical-mask ``table``: (2, T), the losses
    as they are and with the tokens the tokenizer never emits after ``previous`` (T,) masked,
    from the same logits."""
    losses = []
    for i in range(0, hidden.size(0), LOGIT_ROWS):
        logits = logits_of(hidden[i:i + LOGIT_ROWS]).float()
        rows = targets[i:i + LOGIT_ROWS]
        loss = F.cross_entropy(logits, rows, reduction="none", ignore_index=-1)
        if table is not None:
            masked = mask_logits(logits, previous[i:i + LOGIT_ROWS], table)
            loss = torch.stack([loss, F.cross_entropy(masked, rows, reduction="none",
                                                      ignore_index=-1)])
        losses.append(loss)
    return torch.cat(losses, -1)


def speedrun_losses(model, device):
    """token_losses(inputs, targets, rows=None, table=None) for the speedrun GPT over one
    packed sequence: the loss at each of ``rows`` (all T by default), logits formed for those
    rows only; with ``table``, canonically masked (data/canonical_mask.py)."""
    from layers.masks import document_ids

    hidden_states = model.hidden_states
    if device.type == "cuda":  # FlexAttention needs compiling (eagerly it forms T x T scores)
        hidden_states = torch.compile(hidden_states, dynamic=False)

    @torch.no_grad()
    def token_losses(inputs, targets, rows=None, table=None):
        inputs, targets = inputs.to(device), targets.to(device)
        hidden = hidden_states(inputs, document_ids(inputs))[0]
        if rows is not None:
            rows = rows.to(device)
            hidden, targets, inputs = hidden[rows], targets[rows], inputs[rows]
        return cross_entropy_rows(hidden, targets, model.logits, inputs, table)

    return token_losses


def gpt2_losses(model, device):
    """token_losses(inputs, targets, rows=None) for GPT-2: the sequence's documents (each from
    its BOS; the tokens before the first BOS one more), cut into pieces of at most its context,
    become the rows of a padded batch, so that each starts at position 0 and sees only
    itself."""
    context = model.config.n_positions

    @torch.no_grad()
    def token_losses(inputs, targets, rows=None):
        inputs, targets = inputs.to(device).long(), targets.to(device)
        starts = sorted({0, *torch.nonzero(inputs == BOS_ID).flatten().tolist()})
        ends = [*starts[1:], inputs.numel()]
        bounds = [(a, min(a + context, b)) for start, b in zip(starts, ends, strict=True)
                  for a in range(start, b, context)]
        width = max(b - a for a, b in bounds)
        batch = inputs.new_zeros(len(bounds), width)
        for row, (a, b) in enumerate(bounds):
            batch[row, :b - a] = inputs[a:b]
        losses = []
        for first in range(0, len(bounds), max(1, LOGIT_ROWS // width)):
            documents = bounds[first:first + max(1, LOGIT_ROWS // width)]
            logits = model(batch[first:first + len(documents)])
            losses += [F.cross_entropy(logits[i, :b - a].float(), targets[a:b], reduction="none",
                                       ignore_index=-1)
                       for i, (a, b) in enumerate(documents)]
        losses = torch.cat(losses)
        return losses if rows is None else losses[rows.to(device)]

    return token_losses


def val_loss(token_losses, pieces, **options):
    """The mean loss over the scored tokens (target not -1) of the val pieces: a float, or a
    list of them where token_losses gives several rows (unmasked and masked)."""
    total = sum(token_losses(inputs, targets, **options).double().sum(-1).cpu()
                for inputs, targets in pieces)
    return (total / sum(int((targets >= 0).sum()) for _, targets in pieces)).tolist()


# ----------------------------------------------------------------------------------------------
# The command line


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="a model (checkpoints/*_model.safetensors) or "
                                                "a checkpoint")
    parser.add_argument("--gpt2", nargs="?", const="openai-community/gpt2", default=None,
                        metavar="SOURCE", help="evaluate GPT-2 instead: a Hugging Face repo "
                        "(default openai-community/gpt2) or a local folder of its files")
    parser.add_argument("--config", default="config/base.py",
                        help="with --gpt2: the config whose val tokens to use")
    parser.add_argument("--hellaswag_file", default=None, metavar="PATH",
                        help="a local llm.c HellaSwag file (default: download and cache)")
    parser.add_argument("--hellaswag_examples", type=int, default=None, metavar="N",
                        help="only the first N examples (a quick look; the figure then is not "
                             "HellaSwag's)")
    parser.add_argument("--canonical_mask", action="store_true",
                        help="also the val loss with the tokens the tokenizer never emits "
                             "after the previous one masked (modded-nanogpt #350)")
    parser.add_argument("--skip_val", action="store_true")
    parser.add_argument("--skip_hellaswag", action="store_true")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when there is a GPU")
    return parser


def load(args, device):
    """(description, token_losses, run config, whether it is GPT-2) of what is evaluated."""
    import run

    if args.gpt2 is not None:
        from gpt2 import load_gpt2

        model = load_gpt2(args.gpt2, device)
        raw = run.load_config(args.config)
        count = sum(p.numel() for p in model.parameters())
        return (f"GPT-2 from {args.gpt2} ({count:,} parameters)", gpt2_losses(model, device),
                raw, True)
    from checkpoints import load_model

    model, state = load_model(args.path, device)
    raw = state["config"]
    return (f"{args.path} (run {state.get('run_id')}, step {state.get('step')})",
            speedrun_losses(model, device), raw, False)


def evaluate(args) -> dict:
    """Load, measure, print; returns the figures."""
    import run
    from data.loader import validation_pieces
    from train import validation_context
    from utils import repo_path

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hellaswag = None if args.skip_hellaswag else read_hellaswag(hellaswag_path(
        args.hellaswag_file))
    description, token_losses, raw, is_gpt2 = load(args, device)
    raw = run.apply_environment(raw, {"DATA_PATH": os.environ.get("DATA_PATH", "")})
    config = run.build_config(raw)
    tc, micro = config.training, config.training.micro_batch_tokens
    print(f"evaluating {description} on {device.type}")
    figures = {}
    if not args.skip_val:
        # GPT-2 takes a chunk whole (its rows are documents); the speedrun GPT in the
        # trainer's pieces, each behind the context its receptive field needs
        piece, context = ((tc.val_chunk_tokens, 0) if is_gpt2 else
                          (micro, validation_context(config.model, config.schedule)))
        try:
            pieces, scored = validation_pieces(
                repo_path(config.data.val_pattern), tc.val_tokens, tc.val_chunk_tokens, piece,
                context, vocab_size=config.model.vocab_size)
        except FileNotFoundError as exc:
            raise EvalError(f"{exc}: set DATA_PATH to the folder of the val shards, or "
                            "download FineWeb's (python data/cached_fineweb10B.py 1)") from exc
        if not pieces:
            raise EvalError(f"the val shards {config.data.val_pattern} hold less than one chunk "
                            f"of val_chunk_tokens={tc.val_chunk_tokens:,} tokens")
        if args.canonical_mask:  # both losses from the same logits
            table = torch.from_numpy(build_canonical_mask(config.model.padded_vocab))
            figures["val_loss"], figures["val_loss_canonical"] = val_loss(
                token_losses, pieces, table=table.to(device))
        else:
            figures["val_loss"] = val_loss(token_losses, pieces)
        figures["val_tokens"] = scored
        print(f"FineWeb val loss {figures['val_loss']:.4f} over {scored:,} tokens of "
              f"{config.data.val_pattern}")
        if args.canonical_mask:
            print(f"FineWeb val loss {figures['val_loss_canonical']:.4f} with non-canonical "
                  "tokens masked (#350)")
    if hellaswag is not None:
        examples = hellaswag[:args.hellaswag_examples]
        longest_example = max(sum(len(e.context) + len(end) for end in e.endings)
                              for e in examples)
        block = config.model.block_size
        seq_len = max(micro, -(-longest_example // block) * block)
        correct, total = hellaswag_accuracy(token_losses, pack_hellaswag(examples, seq_len))
        figures.update(hellaswag_correct=correct, hellaswag_total=total)
        note = "" if total == HELLASWAG_EXAMPLES else f" (HellaSwag has {HELLASWAG_EXAMPLES:,})"
        print(f"HellaSwag accuracy {correct / total:.2%} ({correct:,} of {total:,} examples"
              f"{note})")
    return figures


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from checkpoints import CheckpointError
    from data.shards import ShardError
    from utils import ConfigError

    problem = None
    if (args.path is None) == (args.gpt2 is None):
        problem = "give a model or checkpoint PATH, or --gpt2 (not both)"
    elif args.path is not None and not Path(args.path).is_file():
        problem = f"no model or checkpoint file at {args.path}"
    elif args.canonical_mask and (args.gpt2 is not None or args.skip_val):
        problem = ("--canonical_mask masks the val loss of a speedrun model (softcapped "
                   "logits): not with --gpt2 or --skip_val")
    elif args.hellaswag_examples is not None and args.hellaswag_examples < 1:
        problem = "--hellaswag_examples must be at least 1"
    elif args.device == "cuda" and not torch.cuda.is_available():
        problem = "--device cuda: no CUDA GPU was found (use --device cpu)"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        evaluate(args)
    except (EvalError, CheckpointError, ConfigError, ShardError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
