"""Tests for data/: shard format, packing loader, FineWeb download, corpus preparation."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data import cached_fineweb10B
from data.cached_fineweb10B import DEFAULT_FINEWEB_DIR, download_fineweb
from data.loader import BatchStream, BOSFinder, DataLoader, find_shards, validation_pieces
from data.prepare_corpus import prepare_corpus
from data.shards import (
    BOS_ID,
    HEADER_BYTES,
    HEADER_INTS,
    MAGIC,
    VERSION,
    VOCAB_SIZE,
    ShardError,
    read_shard,
    write_shard,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
PROXY_CORPUS = SHARED / "corpus"

T = 256  # micro-batch tokens in the loader tests
MAX_SEQ_LEN = 96


def random_docs(rng: np.random.Generator, num_docs: int, max_len: int = 200) -> list[np.ndarray]:
    """Documents of random lengths (many longer than MAX_SEQ_LEN), each opening with BOS."""
    lengths = rng.integers(1, max_len, size=num_docs)
    return [np.concatenate([[BOS_ID], rng.integers(0, BOS_ID, size=n - 1)]) for n in lengths]


def write_docs(path: Path, docs: list[np.ndarray], lead: int = 0) -> np.ndarray:
    """Write docs as a shard, after ``lead`` tokens of a document begun in an earlier shard."""
    tokens = np.concatenate([np.full(lead, 7), *docs]).astype(np.uint16)
    write_shard(path, tokens)
    return tokens


@pytest.fixture
def train_shards(tmp_path) -> list[np.ndarray]:
    """Three shards named train_00000{0,1,2}.bin in tmp_path; the second opens mid-document."""
    rng = np.random.default_rng(0)
    return [
        write_docs(tmp_path / f"train_{i:06d}.bin", random_docs(rng, 30), lead=25 * (i == 1))
        for i in range(3)
    ]


def take(stream, n: int) -> list:
    return [stream.next_batch() for _ in range(n)]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.inputs, y.inputs) and np.array_equal(x.targets, y.targets)
        and x.segments == y.segments
        for x, y in zip(a, b, strict=True)
    )


# ----------------------------------------------------------------------------- shards


def test_shard_round_trip(tmp_path):
    tokens = np.array([BOS_ID, 0, 1, 65535, 15496, 995], dtype=np.int64)
    path = write_shard(tmp_path / "a.bin", tokens)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    assert list(header[:3]) == [MAGIC, VERSION, tokens.size] and not header[3:].any()
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    back = read_shard(path, vocab_size=65536)  # the format holds any uint16
    assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("bad", [VOCAB_SIZE, 50303, 65535])
def test_read_shard_rejects_ids_outside_the_vocabulary(tmp_path, bad):
    tokens = np.full(1000, 42)
    tokens[[0, 600]] = BOS_ID  # the largest valid id
    tokens[[17, 901]] = bad
    path = write_shard(tmp_path / "ids.bin", tokens)
    with pytest.raises(ShardError, match=f"2 token ids are >= the vocabulary size {VOCAB_SIZE} "
                                         f"\\(the first: {bad} at position 17\\)"):
        read_shard(path)
    tokens[[17, 901]] = BOS_ID - 1
    assert np.array_equal(read_shard(write_shard(path, tokens)), tokens)


@pytest.mark.parametrize("tokens", [[], [1, 65536], [-1, 3], [0.5, 1.0]])
def test_write_shard_rejects_unstorable_tokens(tmp_path, tokens):
    with pytest.raises(ValueError, match="bad.bin"):
        write_shard(tmp_path / "bad.bin", np.array(tokens))
    assert not (tmp_path / "bad.bin").exists()


def corrupt(path: Path, how: str) -> None:
    """Damage a valid shard of 10 tokens at ``path`` in one way."""
    data = bytearray(path.read_bytes())
    header = np.frombuffer(data, dtype="<i4", count=HEADER_INTS).copy()
    if how == "short":
        data = data[:100]
    elif how == "truncated":
        data = data[:-2]
    elif how == "extra":
        data += b"\0\0"
    else:
        field, value = {"magic": (0, 12345), "version": (1, 7), "empty": (2, 0)}[how]
        header[field] = value
        data[:HEADER_BYTES] = header.tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how, message",
    [
        ("short", "too short for a header: the file is 100 bytes"),
        ("magic", "bad magic number 12345 .expected 20240520."),
        ("version", "unsupported version 7"),
        ("empty", "claims 0 tokens"),
        ("truncated", "truncated: .*1044 bytes are expected, but the file is 1042 bytes"),
        ("extra", "size mismatch: .*1044 bytes are expected, but the file is 1046 bytes"),
    ],
)
def test_read_shard_names_file_and_problem(tmp_path, how, message):
    path = write_shard(tmp_path / f"shard_{how}.bin", np.arange(10))
    corrupt(path, how)
    with pytest.raises(ShardError, match=message) as info:
        read_shard(path)
    assert str(path) in str(info.value) and info.value.path == path
    assert isinstance(info.value, ValueError)


# ----------------------------------------------------------------------------- find_shards


def test_find_shards_sorts_and_reports_missing_pattern(tmp_path):
    for name in ("x_000002.bin", "x_000000.bin", "x_000001.bin", "y_000000.bin"):
        write_shard(tmp_path / name, [BOS_ID])
    found = find_shards(str(tmp_path / "x_*.bin"))
    assert [p.name for p in found] == ["x_000000.bin", "x_000001.bin", "x_000002.bin"]
    missing = str(tmp_path / "nothing_*.bin")
    with pytest.raises(FileNotFoundError, match="nothing_"):
        find_shards(missing)


# ----------------------------------------------------------------------------- BOSFinder


def full_pass(finder: BOSFinder, room: int) -> list[list[tuple[int, int]]]:
    calls = []
    while not finder.exhausted:
        calls.append(finder.next_segments(room))
    return calls


@pytest.mark.parametrize("lookahead", [0, 8, 64])
def test_bosfinder_full_pass_serves_each_token_once(train_shards, lookahead):
    tokens = train_shards[1]  # opens with 25 tokens of a document from an earlier shard
    finder = BOSFinder(tokens, MAX_SEQ_LEN, lookahead)
    calls = full_pass(finder, T)
    assert all(sum(n for _, n in segs) == T for segs in calls[:-1])  # batches are filled
    assert 0 < sum(n for _, n in calls[-1]) <= T
    coverage = np.zeros(tokens.size, dtype=np.int64)
    starts = []
    for start, length in (seg for segs in calls for seg in segs):
        assert tokens[start] == BOS_ID and 1 <= length <= MAX_SEQ_LEN
        coverage[start:start + length] += 1
        starts.append(start)
    assert coverage.max() == 1  # no token served twice
    assert sorted(starts) == list(np.flatnonzero(tokens == BOS_ID))  # every document served once
    assert finder.served_tokens == coverage.sum()
    assert finder.served_tokens + finder.dropped_tokens == tokens.size
    assert coverage[:25].sum() == 0


def test_bosfinder_best_fit_places_a_later_document():
    docs = [np.concatenate([[BOS_ID], np.arange(1, n)]) for n in (6, 7, 4, 3)]
    tokens = np.concatenate(docs).astype(np.uint16)  # documents start at 0, 6, 13, 17
    best_fit = BOSFinder(tokens, max_seq_len=10, lookahead=4)
    assert full_pass(best_fit, 10) == [[(0, 6), (13, 4)], [(6, 7), (17, 3)]]
    assert best_fit.dropped_tokens == 0
    in_order = BOSFinder(tokens, max_seq_len=10, lookahead=0)
    assert full_pass(in_order, 10) == [[(0, 6), (6, 4)], [(13, 4), (17, 3)]]
    assert in_order.dropped_tokens == 3


def test_bosfinder_cuts_the_document_that_wastes_least():
    docs = [np.concatenate([[BOS_ID], np.arange(1, n)]) for n in (6, 9, 5, 7)]
    tokens = np.concatenate(docs).astype(np.uint16)  # documents start at 0, 6, 15, 20
    finder = BOSFinder(tokens, max_seq_len=10, lookahead=4)
    # Nothing fits the last 4 tokens of the first batch: the 5-token document is cut (1 lost),
    # not the 9-token one next in line (5 lost).
    assert full_pass(finder, 10) == [[(0, 6), (15, 4)], [(6, 9), (20, 1)]]
    assert finder.dropped_tokens == 1 + 6


def test_bosfinder_cuts_long_documents_to_max_seq_len():
    tokens = np.concatenate([[BOS_ID], np.arange(1, 30), [BOS_ID, 5]]).astype(np.uint16)
    finder = BOSFinder(tokens, max_seq_len=8, lookahead=4)
    assert full_pass(finder, 16) == [[(0, 8), (30, 2)]]
    assert (finder.served_tokens, finder.dropped_tokens) == (10, 22)


def test_best_fit_drops_fewer_tokens_than_packing_in_order(train_shards):
    dropped = {}
    for lookahead in (0, 64):
        finder = BOSFinder(np.concatenate(train_shards), MAX_SEQ_LEN, lookahead)
        full_pass(finder, T)
        dropped[lookahead] = finder.dropped_tokens
    assert dropped[64] < dropped[0]


# ----------------------------------------------------------------------------- BatchStream


def test_batches_are_bos_aligned_with_the_packed_rows_next_tokens(tmp_path, train_shards):
    files = find_shards(str(tmp_path / "train_*.bin"))
    stream = BatchStream(files, T, MAX_SEQ_LEN)
    batches = take(stream, 60)  # about two passes over the three shards
    assert stream.epoch >= 1
    for batch in batches:
        assert batch.inputs.dtype == np.int32 and batch.targets.dtype == np.int64
        assert batch.inputs.shape == batch.targets.shape == (T,)
        assert batch.inputs[0] == BOS_ID
        offsets = np.cumsum([0] + [n for _, _, n in batch.segments])
        assert offsets[-1] == T
        # Documents hold no inner BOS, so BOS marks exactly the segment starts.
        assert list(np.flatnonzero(batch.inputs == BOS_ID)) == list(offsets[:-1])
        for i, ((shard, start, length), offset) in enumerate(zip(batch.segments, offsets,
                                                                  strict=False)):
            assert length <= MAX_SEQ_LEN
            tokens = np.append(train_shards[shard], BOS_ID)  # BOS follows a shard's last token
            assert np.array_equal(batch.inputs[offset:offset + length],
                                  tokens[start:start + length])
            want = tokens[start + 1:start + length + 1].copy()
            if i < len(batch.segments) - 1:  # the row's next token: the next segment's BOS
                want[-1] = BOS_ID
            assert np.array_equal(batch.targets[offset:offset + length], want)
        # the records' targets: the row shifted by one, and the last one the true next token
        assert np.array_equal(batch.targets[:-1], batch.inputs[1:])
    starts = [(shard, start) for b in batches for shard, start, _ in b.segments]
    first_doc = (0, int(np.flatnonzero(train_shards[0] == BOS_ID)[0]))
    assert starts.count(first_doc) == stream.epoch + 1  # served again after each wrap


def test_a_document_cut_by_max_seq_len_ends_on_bos_unless_it_ends_the_batch(tmp_path):
    # As the records' loader: the segments are one row and the targets that row shifted by
    # one, so a document cut short by max_seq_len is trained to end there; the micro-batch's
    # last segment keeps its true next token.
    write_shard(tmp_path / "s.bin", [BOS_ID, 1, 2, 3, 4, 5, BOS_ID, 6, 7, 8, 9])
    stream = BatchStream([tmp_path / "s.bin"], micro_batch_tokens=8, max_seq_len=4, lookahead=0)
    batch = stream.next_batch()
    assert batch.inputs.tolist() == [BOS_ID, 1, 2, 3, BOS_ID, 6, 7, 8]
    assert batch.targets.tolist() == [1, 2, 3, BOS_ID, 6, 7, 8, 9]


def test_targets_continue_cut_documents_and_end_whole_ones(tmp_path):
    write_shard(tmp_path / "s.bin", [BOS_ID, 1, 2, 3, BOS_ID, 4, 5])
    stream = BatchStream([tmp_path / "s.bin"], micro_batch_tokens=4, max_seq_len=4, lookahead=0)
    first, second = take(stream, 2)
    assert first.inputs.tolist() == [BOS_ID, 1, 2, 3]
    assert first.targets.tolist() == [1, 2, 3, BOS_ID]  # whole document: next one's BOS
    # The second document ends the shard (target BOS); the pass wraps and the first document
    # is cut to the one token left, whose target is its own next token.
    assert second.inputs.tolist() == [BOS_ID, 4, 5, BOS_ID]
    assert second.targets.tolist() == [4, 5, BOS_ID, 1]
    assert stream.epoch == 1


def test_stream_rejects_bad_arguments_and_bos_free_data(tmp_path):
    write_shard(tmp_path / "plain.bin", np.arange(1, 50))
    with pytest.raises(ValueError, match="max_seq_len <= micro_batch_tokens"):
        BatchStream([tmp_path / "plain.bin"], micro_batch_tokens=8, max_seq_len=16)
    with pytest.raises(ValueError, match="rank < world_size"):
        BatchStream([tmp_path / "plain.bin"], 8, 8, rank=2, world_size=2)
    write_shard(tmp_path / "plain2.bin", np.arange(1, 50))
    with pytest.raises(ShardError, match="plain.bin: no document start .BOS 50256. in it or in "
                                         "the 1 other shard of the pattern"):
        BatchStream([tmp_path / "plain.bin", tmp_path / "plain2.bin"], 8, 8).next_batch()


def test_resume_gives_identical_batches(tmp_path, train_shards):
    files = find_shards(str(tmp_path / "train_*.bin"))
    stream = BatchStream(files, T, MAX_SEQ_LEN, lookahead=8)
    states, batches = [stream.state_dict()], []
    for _ in range(50):
        batches.append(stream.next_batch())
        states.append(json.loads(json.dumps(stream.state_dict())))  # must survive JSON
    with_deferred = [k for k, s in enumerate(states) if s["position"] and s["position"]["deferred"]]
    crossing = [k for k, b in enumerate(batches) if len({s for s, _, _ in b.segments}) > 1]
    assert with_deferred and crossing  # the cases that matter do occur here
    for k in {0, with_deferred[0], crossing[0], crossing[-1], 40}:
        resumed = BatchStream(files, T, MAX_SEQ_LEN, lookahead=8)
        resumed.load_state_dict(states[k])
        assert same_batches(take(resumed, 50 - k), batches[k:]), f"resume from batch {k}"


def test_load_state_rejects_other_shards(tmp_path, train_shards):
    stream = BatchStream(find_shards(str(tmp_path / "train_*.bin")), T, MAX_SEQ_LEN)
    state = stream.state_dict()
    state["shard_name"] = "fineweb_train_000001.bin"
    with pytest.raises(ValueError, match="fineweb_train_000001.bin"):
        stream.load_state_dict(state)


def rank0_state_after(files, rounds: int) -> dict:
    rank0 = BatchStream(files, T, MAX_SEQ_LEN, rank=0, world_size=2)
    take(rank0, rounds)
    return rank0.state_dict()


def test_ranks_partition_the_single_rank_stream(tmp_path, train_shards):
    files = find_shards(str(tmp_path / "train_*.bin"))
    reference = take(BatchStream(files, T, MAX_SEQ_LEN), 40)
    ranks = [BatchStream(files, T, MAX_SEQ_LEN, rank=r, world_size=2) for r in range(2)]
    dealt = [batch for _ in range(20) for batch in (ranks[0].next_batch(), ranks[1].next_batch())]
    assert same_batches(dealt, reference)
    assert ranks[0].state_dict() == ranks[1].state_dict()  # a round's end, the same everywhere
    # Rank 1 resumed from rank 0's saved state continues with its own share.
    resumed = BatchStream(files, T, MAX_SEQ_LEN, rank=1, world_size=2)
    resumed.load_state_dict(rank0_state_after(files, rounds=7))
    assert same_batches(take(resumed, 3), [reference[15], reference[17], reference[19]])
    # The state is a position in the single-rank stream: one rank resumes from it too.
    single = BatchStream(files, T, MAX_SEQ_LEN)
    single.load_state_dict(rank0_state_after(files, rounds=7))
    assert same_batches(take(single, 3), reference[14:17])


# ----------------------------------------------------------------------------- DataLoader


def test_preloader_matches_synchronous_loader(tmp_path, train_shards):
    pattern = str(tmp_path / "train_*.bin")
    with (DataLoader(pattern, T, MAX_SEQ_LEN, prefetch=False) as sync,
          DataLoader(pattern, T, MAX_SEQ_LEN, prefetch=True, prefetch_depth=3) as ahead):
        assert ahead.state_dict() == sync.state_dict()
        for _ in range(45):
            x_sync, y_sync = sync.next_batch()
            x, y = ahead.next_batch()
            assert x.dtype == torch.int32 and y.dtype == torch.int64 and x.shape == (T,)
            assert torch.equal(x, x_sync) and torch.equal(y, y_sync)
            # The consumer's position, though the thread has prepared batches beyond it.
            assert ahead.state_dict() == sync.state_dict()


def test_preloader_resumes_from_a_saved_state(tmp_path, train_shards):
    pattern = str(tmp_path / "train_*.bin")
    with DataLoader(pattern, T, MAX_SEQ_LEN) as loader:
        for _ in range(17):
            loader.next_batch()
        state = loader.state_dict()
        expected = [loader.next_batch() for _ in range(10)]
        loader.load_state_dict(state)  # rewinds a running preloader
        again = [loader.next_batch() for _ in range(10)]
    with DataLoader(pattern, T, MAX_SEQ_LEN) as fresh:
        fresh.load_state_dict(state)
        resumed = [fresh.next_batch() for _ in range(10)]
    for (x, y), (x2, y2), (x3, y3) in zip(expected, again, resumed, strict=True):
        assert torch.equal(x, x2) and torch.equal(x, x3)
        assert torch.equal(y, y2) and torch.equal(y, y3)


@pytest.mark.parametrize("prefetch", [True, False])
def test_loader_raises_bad_shard_error_from_its_thread(tmp_path, prefetch):
    rng = np.random.default_rng(1)
    write_docs(tmp_path / "train_000000.bin", random_docs(rng, 10))
    bad = write_shard(tmp_path / "train_000001.bin", np.arange(10))
    corrupt(bad, "magic")
    loader = DataLoader(str(tmp_path / "train_*.bin"), T, MAX_SEQ_LEN, prefetch=prefetch)
    with pytest.raises(ShardError, match="train_000001.bin: bad magic number 12345"):
        for _ in range(10):
            loader.next_batch()
    with pytest.raises(ShardError, match="bad magic"):  # and again, not a hang
        loader.next_batch()
    loader.close()


def test_closed_preloader_stops_its_thread(tmp_path, train_shards):
    loader = DataLoader(str(tmp_path / "train_*.bin"), T, MAX_SEQ_LEN, prefetch_depth=2)
    loader.next_batch()
    thread = loader._preloader._thread
    loader.close()
    loader.close()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        loader.next_batch()


# ----------------------------------------------------------------------------- validation


def scored_stream(pieces):
    """The (input, target) pairs the pieces score, in order."""
    pairs = []
    for x, y in pieces:
        keep = y >= 0
        pairs += list(zip(x[keep].tolist(), y[keep].tolist(), strict=True))
    return pairs


def test_validation_pieces_score_the_stream_once(tmp_path, train_shards):
    """Chunks of the shards read as one stream (across the shard boundary, not aligned to
    documents), each token scored once, its context before it; the same every call."""
    pattern = str(tmp_path / "train_*.bin")
    stream = np.concatenate(train_shards)
    chunk, piece, context = 3 * T, T, 96
    pieces, scored = validation_pieces(pattern, 4 * chunk, chunk, piece, context)
    assert scored == 4 * chunk and all(x.shape == (piece,) for x, _ in pieces)
    assert scored_stream(pieces) == list(zip(stream[:scored].tolist(),
                                             stream[1:scored + 1].tolist(), strict=True))
    for _, y in pieces[1:3]:  # the chunk's second and third pieces: their context first
        assert (y[:context] == -1).all() and (y[context:] >= 0).any()
    again, _ = validation_pieces(pattern, 4 * chunk, chunk, piece, context)
    assert all(torch.equal(a, b) for p, q in zip(pieces, again, strict=True)
               for a, b in zip(p, q, strict=True))
    halves = [validation_pieces(pattern, 4 * chunk, chunk, piece, context, rank=r,
                                world_size=2)[0] for r in (0, 1)]
    per_chunk = len(pieces) // 4
    for r in (0, 1):
        mine = [pieces[(2 * i + r) * per_chunk + j] for i in range(2) for j in range(per_chunk)]
        assert scored_stream(halves[r]) == scored_stream(mine)


def test_validation_pieces_take_the_whole_chunks_there_are(tmp_path, train_shards):
    pattern = str(tmp_path / "train_*.bin")
    total = sum(s.size for s in train_shards)
    chunks = (total - 1) // (2 * T)
    pieces, scored = validation_pieces(pattern, 2 * T * (chunks + 5), 2 * T, 2 * T, 0)
    assert scored == 2 * T * chunks and len(pieces) == chunks
    _, scored_two = validation_pieces(pattern, 2 * T * (chunks + 5), 2 * T, 2 * T, 0, rank=1,
                                      world_size=2)
    assert scored_two == 2 * T * (chunks - chunks % 2)  # as many chunks for every rank


@pytest.mark.skipif(not (PROXY_CORPUS / "proxy_val_000000.bin").exists(),
                    reason="proxy corpus not present")
def test_proxy_corpus_reads_and_packs():
    tokens = read_shard(PROXY_CORPUS / "proxy_val_000000.bin")
    assert tokens[0] == BOS_ID and tokens.size > 100_000
    finder = BOSFinder(tokens, max_seq_len=2048)
    full_pass(finder, 64 * 1024)
    assert finder.served_tokens + finder.dropped_tokens == tokens.size
    lengths = np.diff(np.flatnonzero(tokens == BOS_ID), append=tokens.size)
    long_tails = np.maximum(lengths - 2048, 0).sum()
    assert finder.dropped_tokens - long_tails < 0.001 * tokens.size  # best fit wastes little
    pieces, scored = validation_pieces(str(PROXY_CORPUS / "proxy_val_*.bin"), 4 * 8192,
                                       8192, 8192, 0)
    assert scored == 4 * 8192 and pieces[0][0][0].item() == BOS_ID


# ----------------------------------------------------------------------------- download


class FakeHub:
    """Stands in for hf_hub_download: records calls and writes a file, or fails."""

    def __init__(self, error: Exception | None = None):
        self.calls: list[dict] = []
        self.error = error

    def __call__(self, **kwargs) -> str:
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        path = Path(kwargs["local_dir"]) / kwargs["filename"]
        path.write_bytes(b"shard")
        return str(path)


def test_download_fetches_missing_files_only(tmp_path):
    (tmp_path / "fineweb_val_000000.bin").write_bytes(b"already here")
    (tmp_path / "fineweb_train_000002.bin").write_bytes(b"already here")
    hub = FakeHub()
    paths = download_fineweb(3, tmp_path, hf_download=hub)
    assert [p.name for p in paths] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin",
                                       "fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    assert all(p.exists() and p.parent == tmp_path for p in paths)
    assert [c["filename"] for c in hub.calls] == ["fineweb_train_000001.bin",
                                                  "fineweb_train_000003.bin"]
    assert all(c["repo_id"] == "kjj0/fineweb10B-gpt2" and c["repo_type"] == "dataset"
               and Path(c["local_dir"]) == tmp_path for c in hub.calls)
    assert (tmp_path / "fineweb_val_000000.bin").read_bytes() == b"already here"


@pytest.mark.parametrize("count, error", [(0, ValueError), (104, ValueError), (-2, ValueError),
                                          (True, TypeError), ("3", TypeError)])
def test_download_validates_shard_count(tmp_path, count, error):
    hub = FakeHub()
    with pytest.raises(error, match="num_train_shards"):
        download_fineweb(count, tmp_path / "out", hf_download=hub)
    assert not hub.calls and not (tmp_path / "out").exists()


def test_download_failure_names_the_file(tmp_path):
    hub = FakeHub(error=OSError("connection refused"))
    with pytest.raises(RuntimeError, match="fineweb_val_000000.bin.*connection refused"):
        download_fineweb(1, tmp_path, hf_download=hub)


def test_download_defaults_and_script_mode():
    assert DEFAULT_FINEWEB_DIR == REPO_ROOT / "data" / "fineweb10B"
    assert cached_fineweb10B.DEFAULT_TRAIN_PATTERN.endswith("fineweb_train_*.bin")
    # As a script from the repo root; a bad count fails before the hub is imported.
    result = subprocess.run([sys.executable, "data/cached_fineweb10B.py", "0"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "between 1 and 103" in result.stderr


# ----------------------------------------------------------------------------- prepare_corpus


def corpus_docs(count: int) -> list[str]:
    return [f"Document {i} begins.\nIt has a second line, caf\u00e9 {i * 17}.\n"
            f"<|endoftext|> stays text." * (1 + i % 4) for i in range(count)]


def read_split(paths: list[Path], encoding) -> list[str]:
    docs = []
    for path in paths:
        tokens = read_shard(path)
        assert tokens[0] == BOS_ID  # shards start at a document
        for doc in np.split(tokens, np.flatnonzero(tokens == BOS_ID)[1:]):
            docs.append(encoding.decode(doc[1:].tolist()))
    return docs


def test_prepare_text_corpus_round_trip(tmp_path, gpt2):
    docs = corpus_docs(23)
    source = tmp_path / "corpus.txt"
    source.write_text("\n\n\n".join(docs) + "\n\n", encoding="utf-8")
    out = prepare_corpus(source, tmp_path / "out", "tiny", val_every=5, shard_tokens=200)
    assert [p.name for p in out["val"]][:1] == ["tiny_val_000000.bin"]
    assert [p.name for p in out["train"]][:2] == ["tiny_train_000000.bin", "tiny_train_000001.bin"]
    assert read_split(out["val"], gpt2) == [d.rstrip("\n") for d in docs[::5]]
    train = [d.rstrip("\n") for i, d in enumerate(docs) if i % 5]
    assert read_split(out["train"], gpt2) == train
    for path in out["train"]:
        size = read_shard(path).size
        assert size <= 200 or np.count_nonzero(read_shard(path) == BOS_ID) == 1


def test_prepare_jsonl_and_line_corpora(tmp_path, gpt2):
    docs = corpus_docs(6)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    out = prepare_corpus(jsonl, tmp_path / "j", "j", text_key="body", val_every=3)
    assert read_split(out["val"], gpt2) == [docs[0], docs[3]]
    assert read_split(out["train"], gpt2) == [docs[1], docs[2], docs[4], docs[5]]
    lines = tmp_path / "c.txt"
    lines.write_text("one\n\ntwo\nthree\n")
    out = prepare_corpus(lines, tmp_path / "l", "l", fmt="lines", val_every=2)
    assert read_split(out["train"], gpt2) == ["two"]
    assert read_split(out["val"], gpt2) == ["one", "three"]


def test_prepare_corpus_errors(tmp_path, gpt2):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        prepare_corpus(bad, tmp_path / "o", "b")
    bad.write_text('{"text": "fine"}\n{"other": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: no string field 'text'"):
        prepare_corpus(bad, tmp_path / "o", "b")
    one = tmp_path / "one.txt"
    one.write_text("a single document\n")
    with pytest.raises(ValueError, match="too few for a train split"):
        prepare_corpus(one, tmp_path / "o", "one")


def test_prepare_corpus_script_refuses_then_overwrites_old_shards(tmp_path, gpt2):
    source = tmp_path / "corpus.txt"
    source.write_text("\n\n".join(corpus_docs(4)))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    stale = write_shard(out_dir / "c_train_000005.bin", [BOS_ID])
    command = [sys.executable, "data/prepare_corpus.py", str(source), "--out_dir", str(out_dir),
               "--name", "c", "--val_every", "2"]
    refused = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--overwrite" in refused.stderr and stale.exists()
    done = subprocess.run(command + ["--overwrite"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["c_train_000000.bin", "c_val_000000.bin"]
    assert read_split([out_dir / "c_val_000000.bin"], gpt2) == corpus_docs(4)[::2]
