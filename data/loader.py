"""Packed, document-aligned micro-batches from token shards, for training and validation.

Packing policy (``BOSFinder`` works on one shard at a time; shards go in sorted order, then
around again, counting epochs):

* A micro-batch is exactly ``micro_batch_tokens`` tokens: a row of segments, no padding. Every
  segment starts at a document's ``<|endoftext|>`` (BOS) and is at most ``max_seq_len`` long.
* Documents are taken in stream order; one longer than ``max_seq_len`` keeps its first
  ``max_seq_len`` tokens. When the next document does not fit in the room left, the longest of
  the following ``lookahead`` documents that fits goes in instead (best fit); the skipped ones
  stay queued, first in line. When none of these ``1 + lookahead`` documents fits, the shortest
  of them (the first, on ties) is cut to the room left: cutting the next one instead, often a
  long document that was passed over before, wastes more than packing in order does.
* So no token is served twice in a pass over a shard. The only tokens never served are tails cut
  by ``max_seq_len`` or by a micro-batch's end, and those before a shard's first BOS (a FineWeb
  shard may open with the end of the previous shard's last document); ``BOSFinder`` counts
  served and dropped tokens, which add up to the shard.
* Targets are the next tokens of the packed row, as the records' loader makes them (it
  concatenates the segments and shifts by one): inside a segment the document's next token,
  after a segment's last token the next segment's BOS (end of text), also where ``max_seq_len``
  cut the document short. The micro-batch's last segment ends on its true next token (the
  document's continuation where the micro-batch's end cut it, BOS where it was whole), and BOS
  stands in after a shard's last token.
* With ``world_size`` W the single-rank sequence of micro-batches b0, b1, ... is dealt round
  robin: rank r gets b_{kW+r}. The saved state is taken at the end of a round, so it is the same
  on every rank and any rank's state resumes all of them.
"""

import copy
import glob
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data.shards import BOS_ID, VOCAB_SIZE, ShardError, read_shard
from utils import check_ranges

DEFAULT_LOOKAHEAD = 64
DEFAULT_PREFETCH_DEPTH = 4


@dataclass(frozen=True)
class DataConfig:
    """``data_config``: where the shards are; patterns relative to the repository root."""

    train_pattern: str  # env DATA_PATH=folder overrides both patterns
    val_pattern: str
    num_train_shards: int  # FineWeb train shards downloaded on first use of the default path
    prefetch: bool  # prepare batches in a background thread
    # best fit among the next this many documents; 0: in stream order, as the records pack
    packing_lookahead: int = DEFAULT_LOOKAHEAD

    def __post_init__(self):
        check_ranges("data_config", self, positive=("num_train_shards",),
                     non_negative=("packing_lookahead",))


def find_shards(pattern: str) -> list[Path]:
    """Files matching the glob ``pattern``, sorted by name; FileNotFoundError when none do."""
    paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(
            f"no shard files match the pattern {pattern!r} "
            f"(a relative pattern is looked up from {Path.cwd()})"
        )
    return paths


class BOSFinder:
    """The documents of one shard, and the best-fit queue that turns them into segments."""

    def __init__(self, tokens: np.ndarray, max_seq_len: int, lookahead: int = DEFAULT_LOOKAHEAD):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be at least 1, got {max_seq_len}")
        if lookahead < 0:
            raise ValueError(f"lookahead must be 0 or more, got {lookahead}")
        self.tokens = tokens
        self.max_seq_len = max_seq_len
        self.lookahead = lookahead
        self._starts = np.flatnonzero(tokens == BOS_ID)
        self._lengths = np.diff(self._starts, append=tokens.size)
        # The queue is the skipped documents (ascending, all below _next_doc), then _next_doc on.
        self._deferred: list[int] = []
        self._next_doc = 0
        self.served_tokens = 0
        # Tokens before the first BOS belong to a document begun in another shard.
        self.dropped_tokens = int(self._starts[0]) if self._starts.size else int(tokens.size)

    @property
    def num_docs(self) -> int:
        return int(self._starts.size)

    @property
    def exhausted(self) -> bool:
        """True once every document of the shard has been placed."""
        return not self._deferred and self._next_doc >= self.num_docs

    def next_segments(self, room: int) -> list[tuple[int, int]]:
        """Fill up to ``room`` tokens; return the placed (start, length) segments in order.

        The room is filled exactly unless the shard runs out of documents first.
        """
        segments = []
        while room > 0 and not self.exhausted:
            doc = self._pick(room)
            full = int(self._lengths[doc])
            length = min(full, self.max_seq_len, room)
            segments.append((int(self._starts[doc]), length))
            self.served_tokens += length
            self.dropped_tokens += full - length
            room -= length
        return segments

    def _pick(self, room: int) -> int:
        """Take the document to place next in ``room`` tokens off the queue."""
        queued = self._queued(1 + self.lookahead)
        doc = queued[0]
        if min(int(self._lengths[doc]), self.max_seq_len) > room and len(queued) > 1:
            window = np.array(queued)
            capped = np.minimum(self._lengths[window], self.max_seq_len)
            fits = capped <= room
            # The longest that fits, else the one whose cut wastes least; the first on ties.
            best = np.argmax(np.where(fits, capped, -1)) if fits.any() else np.argmin(capped)
            doc = int(window[best])
        if doc < self._next_doc:
            self._deferred.remove(doc)
        else:
            self._deferred.extend(range(self._next_doc, doc))
            self._next_doc = doc + 1
        return doc

    def _queued(self, count: int) -> list[int]:
        """The first ``count`` documents of the queue (fewer near the shard's end)."""
        docs = self._deferred[:count]
        stop = min(self._next_doc + count - len(docs), self.num_docs)
        return docs + list(range(self._next_doc, stop))

    def state_dict(self) -> dict:
        return {
            "next_doc": self._next_doc,
            "deferred": list(self._deferred),
            "served_tokens": self.served_tokens,
            "dropped_tokens": self.dropped_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        next_doc, deferred = int(state["next_doc"]), [int(d) for d in state["deferred"]]
        if not 0 <= next_doc <= self.num_docs or deferred != sorted(set(deferred)) or any(
            not 0 <= d < next_doc for d in deferred
        ):
            raise ValueError(
                f"loader state (next_doc={next_doc}, deferred={deferred}) does not fit a shard "
                f"of {self.num_docs} documents"
            )
        self._next_doc, self._deferred = next_doc, deferred
        self.served_tokens = int(state["served_tokens"])
        self.dropped_tokens = int(state["dropped_tokens"])


class Batch(NamedTuple):
    inputs: np.ndarray  # int32, micro_batch_tokens long
    targets: np.ndarray  # int64, the next token of each input
    segments: list[tuple[int, int, int]]  # (shard index, start in shard, length), in batch order


class BatchStream:
    """The deterministic sequence of packed micro-batches over ``files``, dealt to one rank."""

    def __init__(
        self,
        files: list[Path],
        micro_batch_tokens: int,
        max_seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        lookahead: int = DEFAULT_LOOKAHEAD,
        vocab_size: int = VOCAB_SIZE,
    ):
        if not files:
            raise ValueError("BatchStream needs at least one shard file")
        if not 1 <= max_seq_len <= micro_batch_tokens:
            raise ValueError(
                f"need 1 <= max_seq_len <= micro_batch_tokens, got max_seq_len={max_seq_len}, "
                f"micro_batch_tokens={micro_batch_tokens}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.files = [Path(f) for f in files]
        self.micro_batch_tokens = micro_batch_tokens
        self.max_seq_len = max_seq_len
        self.rank = rank
        self.world_size = world_size
        self.lookahead = lookahead
        self.vocab_size = vocab_size  # every id of a shard is checked below it when read
        self.epoch = 0
        self.shard = 0
        # The shard is read on first use (in the preloader's thread when there is one), and a
        # loaded state's position in it is applied then.
        self._finder: BOSFinder | None = None
        self._pending_position: dict | None = None

    def next_batch(self) -> Batch:
        """This rank's next micro-batch; the other ranks' batches of the round are skipped."""
        for _ in range(self.rank):
            self._assemble(materialize=False)
        batch = self._assemble(materialize=True)
        for _ in range(self.world_size - 1 - self.rank):
            self._assemble(materialize=False)
        return batch

    def _assemble(self, materialize: bool) -> Batch | None:
        """Place the next micro-batch's segments; copy their tokens only if ``materialize``."""
        size = self.micro_batch_tokens
        inputs = np.empty(size, dtype=np.int32) if materialize else None
        targets = np.empty(size, dtype=np.int64) if materialize else None
        segments = []
        filled = 0
        idle_shards = 0  # shards passed without placing a token: guards against BOS-free data
        while filled < size:
            finder = self._current_finder()
            if finder.exhausted:
                idle_shards += 1
                if idle_shards > len(self.files):
                    others = len(self.files) - 1
                    raise ShardError(self.files[self.shard],
                                     f"no document start (BOS {BOS_ID}) in it or in the "
                                     f"{others} other shard{'s' * (others != 1)} of the "
                                     "pattern: every document must begin with <|endoftext|> "
                                     "(data/prepare_corpus.py writes shards so)")
                self._advance_shard()
                continue
            idle_shards = 0
            for start, length in finder.next_segments(size - filled):
                if materialize:
                    end = filled + length
                    _copy_segment(finder.tokens, start, inputs[filled:end], targets[filled:end])
                segments.append((self.shard, start, length))
                filled += length
        if materialize:
            ends = np.cumsum([length for *_, length in segments])[:-1]
            targets[ends - 1] = BOS_ID  # the next segment's first token
        return Batch(inputs, targets, segments) if materialize else None

    def _current_finder(self) -> BOSFinder:
        if self._finder is None:
            self._finder = BOSFinder(
                read_shard(self.files[self.shard], self.vocab_size), self.max_seq_len,
                self.lookahead
            )
            if self._pending_position is not None:
                self._finder.load_state_dict(self._pending_position)
                self._pending_position = None
        return self._finder

    def _advance_shard(self) -> None:
        self.shard += 1
        if self.shard == len(self.files):
            self.shard = 0
            self.epoch += 1
        self._finder = None
        self._pending_position = None

    def state_dict(self) -> dict:
        """The position after the last batch; ``position`` None means the shard's start."""
        if self._finder is not None:
            position = self._finder.state_dict()
        else:
            position = copy.deepcopy(self._pending_position)
        return {
            "epoch": self.epoch,
            "shard": self.shard,
            "shard_name": self.files[self.shard].name,
            "position": position,
        }

    def load_state_dict(self, state: dict) -> None:
        shard = int(state["shard"])
        if not 0 <= shard < len(self.files) or self.files[shard].name != state["shard_name"]:
            found = self.files[shard].name if 0 <= shard < len(self.files) else "nothing"
            raise ValueError(
                f"loader state points at shard {state['shard_name']!r} (index {shard}), but "
                f"index {shard} of these {len(self.files)} shards is {found}"
            )
        self.epoch = int(state["epoch"])
        self.shard = shard
        self._finder = None
        self._pending_position = copy.deepcopy(state["position"])


def _copy_segment(tokens: np.ndarray, start: int, inputs: np.ndarray, targets: np.ndarray):
    """Copy a segment's tokens and their next tokens; BOS stands in past the shard's end."""
    stop = start + inputs.size
    inputs[:] = tokens[start:stop]
    if stop < tokens.size:
        targets[:] = tokens[start + 1:stop + 1]
    else:
        targets[:-1] = tokens[start + 1:stop]
        targets[-1] = BOS_ID


def _to_tensors(batch: Batch, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = torch.from_numpy(batch.inputs), torch.from_numpy(batch.targets)
    if pin:  # page-locked memory lets the copy to the GPU run asynchronously
        inputs, targets = inputs.pin_memory(), targets.pin_memory()
    return inputs, targets


class DataPreloader:
    """Runs a BatchStream in a daemon thread, up to ``depth`` batches ahead of the consumer.

    Batches come out in the same order as from the stream itself. Each carries the stream's state
    taken just after it was made, so ``state_dict`` is the position after the last batch the
    consumer received, however far ahead the thread is. An exception in the thread is raised
    again, unchanged, by the consumer's next ``next_batch``.
    """

    def __init__(self, stream: BatchStream, device="cpu", depth: int = DEFAULT_PREFETCH_DEPTH):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.stream = stream
        self.device = torch.device(device)
        self.depth = depth
        self._pin = self.device.type == "cuda"
        self._state = stream.state_dict()
        self._error: Exception | None = None
        self._thread: threading.Thread | None = None
        self._start()

    def _start(self) -> None:
        # Each thread gets its own queue and stop flag, so one being stopped can never feed
        # stale batches to its successor.
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(self._queue, self._stop), name="data-preloader",
            daemon=True,
        )
        self._thread.start()

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                batch = self.stream.next_batch()
                item = (*_to_tensors(batch, self._pin), self.stream.state_dict())
                if not _put(out, item, stop):
                    return
        except Exception as exc:  # handed over to be raised in the consumer's thread
            _put(out, exc, stop)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            raise RuntimeError("this DataPreloader is closed")
        item = self._get()
        if isinstance(item, Exception):
            self._error = item
            raise item
        inputs, targets, self._state = item
        return (inputs.to(self.device, non_blocking=True),
                targets.to(self.device, non_blocking=True))

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the data preloader thread stopped unexpectedly") from None

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.stream.load_state_dict(state)
        self._state = self.stream.state_dict()
        self._error = None
        self._start()

    def close(self) -> None:
        """Stop the thread and wait for it; a closed preloader restarts on load_state_dict."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; a full queue is retried so stop is noticed."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class DataLoader:
    """The trainer's source of micro-batches: (inputs int32, targets int64), 1-D, on ``device``.

    ``prefetch=True`` prepares batches in a background thread (``DataPreloader``); False makes
    them on demand. Both give the same batches and the same states.
    """

    def __init__(
        self,
        pattern: str,
        micro_batch_tokens: int,
        max_seq_len: int,
        device="cpu",
        rank: int = 0,
        world_size: int = 1,
        prefetch: bool = True,
        lookahead: int = DEFAULT_LOOKAHEAD,
        prefetch_depth: int = DEFAULT_PREFETCH_DEPTH,
        vocab_size: int = VOCAB_SIZE,
    ):
        self.files = find_shards(pattern)
        self.device = torch.device(device)
        self._stream = BatchStream(
            self.files, micro_batch_tokens, max_seq_len, rank, world_size, lookahead, vocab_size
        )
        self._preloader = (
            DataPreloader(self._stream, self.device, prefetch_depth) if prefetch else None
        )

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._preloader is not None:
            return self._preloader.next_batch()
        inputs, targets = _to_tensors(self._stream.next_batch(), pin=False)
        return inputs.to(self.device), targets.to(self.device)

    @property
    def max_seq_len(self) -> int:
        return self._stream.max_seq_len

    def set_max_seq_len(self, max_seq_len: int) -> None:
        """Pack the batches after the last one served with this segment length (a schedule's
        stage may train on shorter documents); batches the preloader made ahead are dropped."""
        if max_seq_len == self._stream.max_seq_len:
            return
        if not 1 <= max_seq_len <= self._stream.micro_batch_tokens:
            raise ValueError(f"max_seq_len must be between 1 and the micro-batch's "
                             f"{self._stream.micro_batch_tokens} tokens, got {max_seq_len}")
        if self._preloader is not None:
            self._preloader.close()
        state = self.state_dict()
        self._stream.max_seq_len = max_seq_len
        self.load_state_dict(state)

    def state_dict(self) -> dict:
        """A JSON-serialisable position: epoch, shard index and name, position in the shard."""
        source = self._preloader if self._preloader is not None else self._stream
        return source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        source = self._preloader if self._preloader is not None else self._stream
        source.load_state_dict(state)

    def close(self) -> None:
        if self._preloader is not None:
            self._preloader.close()

    def __enter__(self) -> "DataLoader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def validation_pieces(
    pattern: str,
    val_tokens: int,
    chunk_tokens: int,
    piece_tokens: int,
    context_tokens: int,
    device="cpu",
    rank: int = 0,
    world_size: int = 1,
    vocab_size: int = VOCAB_SIZE,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """The speedrun's validation set, as micro-batches the model takes; and its token count.

    The val shards are read as one stream, and its first ``val_tokens`` tokens are cut into
    chunks of ``chunk_tokens``, not aligned to documents: attention stays within a chunk (and
    within a document), every token of it is scored, as in the record. Rank r takes chunks r,
    r + W, .... A chunk longer than ``piece_tokens`` goes to the model in pieces: its first
    ``piece_tokens`` tokens, then the next ones each behind the ``context_tokens`` before them,
    which are fed but not scored (target -1): with context at least the model's receptive
    field, every scored token sees exactly what it would in one pass over the chunk. A last
    piece is filled up with BOS, not scored either. When the shards hold fewer tokens, the
    whole chunks they hold are used. Every id is checked below ``vocab_size``.
    """
    stream, need = [], val_tokens + 1  # +1: the last token's target
    for path in find_shards(pattern):
        tokens = read_shard(path, vocab_size)
        stream.append(tokens[:need - sum(map(len, stream))])
        if sum(map(len, stream)) >= need:
            break
    tokens = np.concatenate(stream)
    chunks = min(val_tokens, len(tokens) - 1) // chunk_tokens
    chunks -= chunks % world_size  # every rank the same number
    pieces = []
    for chunk in range(rank, chunks, world_size):
        start = chunk * chunk_tokens
        inputs = tokens[start:start + chunk_tokens].astype(np.int32)
        targets = tokens[start + 1:start + chunk_tokens + 1].astype(np.int64)
        scored = 0
        while scored < chunk_tokens:
            context = min(scored, context_tokens)
            stop = min(scored - context + piece_tokens, chunk_tokens)
            piece = np.full(piece_tokens, BOS_ID, dtype=np.int32)
            piece_targets = np.full(piece_tokens, -1, dtype=np.int64)
            length = stop - (scored - context)
            piece[:length] = inputs[scored - context:stop]
            piece_targets[context:length] = targets[scored:stop]
            pieces.append((torch.from_numpy(piece).to(device),
                           torch.from_numpy(piece_targets).to(device)))
            scored = stop
    return pieces, chunks * chunk_tokens
