"""The token shard format shared by FineWeb10B (llm.c / modded-nanogpt) and this project.

A shard is a header of 256 int32 little-endian values, ``[0] = MAGIC``, ``[1] = VERSION``,
``[2] = number of tokens``, the rest zero, followed by the tokens as uint16 GPT-2 ids. Every
document starts with ``<|endoftext|>`` (``BOS_ID``); a FineWeb shard may begin with the tail of a
document cut at the previous shard's end.
"""

import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 50256  # GPT-2 <|endoftext|>, put in front of every document
VOCAB_SIZE = 50257  # GPT-2's ids are 0 .. 50256
TOKEN_DTYPE = np.dtype("<u2")
HEADER_DTYPE = np.dtype("<i4")
MAX_TOKENS = 2**31 - 1  # the count is an int32 in the header


class ShardError(ValueError):
    """A shard file that is not a valid shard; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"bad token shard {self.path}: {problem}")


def write_shard(path: str | os.PathLike, tokens) -> Path:
    """Write ``tokens`` (any integer sequence of ids < 65536) as a shard; return its path.

    The file appears complete or not at all: it is written beside the target and renamed, so an
    interrupted run never leaves a truncated shard that a later run would try to read.
    """
    path = Path(path)
    array = np.asarray(tokens)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{path}: tokens must be a non-empty 1-D sequence, "
                         f"got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: tokens must be integers, got dtype {array.dtype}")
    if array.size > MAX_TOKENS:
        raise ValueError(f"{path}: {array.size} tokens do not fit the int32 count of the header")
    if array.min() < 0 or array.max() > np.iinfo(TOKEN_DTYPE).max:
        raise ValueError(f"{path}: token ids must lie in [0, 65535] to be stored as uint16")
    header = np.zeros(HEADER_INTS, dtype=HEADER_DTYPE)
    header[:3] = (MAGIC, VERSION, array.size)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(header.tobytes())
        f.write(array.astype(TOKEN_DTYPE, copy=False).tobytes())
    os.replace(partial, path)
    return path


def read_shard_header(path: str | os.PathLike) -> int:
    """Check a shard's header and file size; return its token count. Raises ShardError."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(path, f"too short for a header: the file is {size} bytes, "
                               f"the header alone is {HEADER_BYTES}")
    header = np.fromfile(path, dtype=HEADER_DTYPE, count=HEADER_INTS)
    magic, version, num_tokens = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise ShardError(path, f"bad magic number {magic} (expected {MAGIC})")
    if version != VERSION:
        raise ShardError(path, f"unsupported version {version} (expected {VERSION})")
    if num_tokens <= 0:
        raise ShardError(path, f"header claims {num_tokens} tokens; a shard holds at least one")
    expected = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
    if size != expected:
        problem = "truncated" if size < expected else "size mismatch"
        raise ShardError(
            path,
            f"{problem}: header claims {num_tokens} tokens, so {expected} bytes are expected, "
            f"but the file is {size} bytes",
        )
    return num_tokens


def read_shard(path: str | os.PathLike, vocab_size: int = VOCAB_SIZE) -> np.ndarray:
    """Read a whole shard into memory after validating it; return its tokens as uint16.

    Every id must be below ``vocab_size``: a larger one would fail deep inside the embedding
    lookup, and one between GPT-2's 50257 and the padded table's 50304 would train silently on
    an untrained row. Reading eagerly (not memory-mapping) lets a background loader thread pay
    the disk cost, so the training loop never stalls on page faults.
    """
    num_tokens = read_shard_header(path)
    tokens = np.fromfile(path, dtype=TOKEN_DTYPE, count=num_tokens, offset=HEADER_BYTES)
    if tokens.size != num_tokens:  # the file shrank between the size check and the read
        raise ShardError(path, f"read {tokens.size} tokens, header claims {num_tokens}")
    if tokens.max() >= vocab_size:
        bad = np.flatnonzero(tokens >= vocab_size)
        raise ShardError(path, f"{bad.size} token ids are >= the vocabulary size {vocab_size} "
                               f"(the first: {tokens[bad[0]]} at position {bad[0]}): the shard "
                               "was written with another tokenizer, or is corrupt")
    return tokens
