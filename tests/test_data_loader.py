"""PackedLoader: exactly-once rank partition, resume, mixtures, labels, document ids, bad input."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recpre.data import loader as loader_module
from recpre.data.documents import document_ids, document_position_ids
from recpre.data.loader import PackedLoader
from recpre.data.packed import PackedFile, PackedWriter
from recpre.errors import UserError

REPO = Path(__file__).resolve().parents[1]
B = 8  # block size; rows hold 9 tokens
EOS, PAD = 1, 2


def write_dataset(folder, n_rows, *, offset=0, rows_per_shard=96, rows_per_group=16, fill=5):
    """Row i starts with the unique id offset + i + 10, so a batch tells which rows it holds."""
    folder.mkdir(parents=True, exist_ok=True)
    w = PackedWriter(folder, B, meta={"eos_id": EOS, "pad_id": PAD, "vocab_size": 10**6}, rows_per_shard=rows_per_shard,
                     rows_per_group=rows_per_group)  # fmt: skip
    rows = np.full((n_rows, B + 1), fill, dtype=np.int32)
    rows[:, 0] = np.arange(n_rows) + offset + 10
    w.add_rows(rows)
    w.close()
    return folder


def ids(batch):
    return batch[0][:, 0].tolist()


def epoch_ids(loader):
    return [i for _ in range(len(loader)) for i in ids(next(loader))]


@pytest.fixture(params=["one window", "small windows", "small windows, 4 lanes"])
def windows(request, monkeypatch):
    """Run a test with the default window (the whole tiny dataset) and with 23-row windows, which split row
    groups (16 rows), batches and rank strides at odd places; the last also cuts each window into 4 lanes of
    5-6 rows."""
    if request.param != "one window":
        monkeypatch.setattr(loader_module, "WINDOW_TOKENS", 23 * (B + 1))
    if request.param.endswith("4 lanes"):
        monkeypatch.setattr(loader_module, "LANES", 4)
        monkeypatch.setattr(loader_module, "MIN_LANE_ROWS", 4)
    return request.param


def step_rows(data, world, steps, *, world_batch=16, micro=2, **kw):
    """Rows (as ids) of the first `steps` optimizer steps, one sorted list per step, with the batch split over
    `world` ranks as train.py does: world_batch / (micro x world) consecutive micro-batches per rank."""
    accum = world_batch // (micro * world)
    loaders = [
        PackedLoader([data], block_size=B, micro_batch_size=micro, rank=r, world_size=world, **kw) for r in range(world)
    ]
    out = []
    for _ in range(steps):
        out.append(sorted(i for lo in loaders for _ in range(accum) for i in ids(next(lo))))
    return out


@pytest.mark.parametrize("prefetch", [0, 2])
def test_steps_independent_of_world_size(tmp_path, windows, prefetch):
    """The rows of each optimizer step do not depend on the world size (issue 6: a 2-process run must equal a
    single process with the same world batch), over several epochs when the epoch splits evenly."""
    data = write_dataset(tmp_path / "d", 208)  # divisible by micro x world for worlds 1, 2, 4
    steps = 3 * 208 // 16 + 2  # three epochs and a bit
    ref = step_rows(data, 1, steps, seed=3, prefetch=prefetch)
    for world in (2, 4):
        assert step_rows(data, world, steps, seed=3, prefetch=prefetch) == ref, f"world {world}"
    flat = [i for step in ref[: 208 // 16] for i in step]
    assert sorted(flat) == list(range(10, 218))  # the first epoch is the dataset, exactly once
    assert [i for step in ref[:3] for i in step] != sorted(i for step in ref[:3] for i in step)  # shuffled


def test_uneven_epoch_only_tail_differs(tmp_path, windows):
    """With N not divisible by micro x world, only the skipped tail of an epoch depends on the world size."""
    data = write_dataset(tmp_path / "d", 203)  # usable rows: 202 (world 1), 200 (worlds 2, 4)
    steps = 200 // 16
    ref = step_rows(data, 1, steps, seed=5)
    for world in (2, 4):
        assert step_rows(data, world, steps, seed=5) == ref, f"world {world}"


def test_rank_reads_only_its_lanes(tmp_path, monkeypatch):
    """A rank reads only the row groups holding its rows, each once per window: a window of 8192 rows is 128
    lanes of 64 rows (16 groups of 4 rows), and rank 3 of 32 owns lanes 3, 35, 67, 99 in full: it reads
    their 64 groups and nothing else (read amplification 1, not the world size)."""
    data = write_dataset(tmp_path / "d", 8192, rows_per_shard=1024, rows_per_group=4)
    reads = []
    original = PackedFile.read_group

    def counting(self, index):
        reads.append((self.path.name, index))
        return original(self, index)

    monkeypatch.setattr(PackedFile, "read_group", counting)
    loader = PackedLoader([data], block_size=B, micro_batch_size=1, rank=3, world_size=32, prefetch=0, num_epochs=1)
    got = [i for x, _ in loader for i in x[:, 0].tolist()]
    assert len(got) == len(set(got)) == 256
    assert len(reads) == len(set(reads)) == 64


@pytest.mark.parametrize("world", [1, 2, 3])
def test_partition_exactly_once(tmp_path, world, windows):
    n = 2 * 3 * 4 * 25  # divisible by world x micro_batch for every world size here
    data = write_dataset(tmp_path / "d", n)
    for epoch in range(2):
        seen, counts = [], set()
        for rank in range(world):
            loader = PackedLoader([data], block_size=B, micro_batch_size=4, rank=rank, world_size=world, seed=1,
                                  num_epochs=epoch + 1, prefetch=2)  # fmt: skip
            got = [i for x, _ in loader for i in x[:, 0].tolist()]
            got = got[len(got) // (epoch + 1) * epoch :]  # this epoch only
            counts.add(len(got))
            seen += got
            assert loader.epoch == epoch + 1
        assert sorted(seen) == list(range(10, n + 10)), "every row exactly once per epoch"
        assert len(counts) == 1


@pytest.mark.parametrize("world", [1, 2, 3, 5, 7])
def test_exactly_once_for_odd_row_counts(tmp_path, world, windows):
    """Issue 19.5: every rank reads each row at most once per epoch and the ranks agree on the batch count,
    for row counts that divide neither the world size nor the micro-batch, over two epochs."""
    for n, micro in ((101, 1), (97, 2), (211, 3)):
        data = write_dataset(tmp_path / f"d{n}", n, rows_per_group=5)
        usable = n // (world * micro) * (world * micro)
        for epoch in range(2):
            seen, counts = [], set()
            for rank in range(world):
                loader = PackedLoader([data], block_size=B, micro_batch_size=micro, rank=rank, world_size=world,
                                      seed=epoch, num_epochs=epoch + 1, prefetch=2 * rank)  # fmt: skip
                got = [i for x, _ in loader for i in x[:, 0].tolist()]
                got = got[len(got) // (epoch + 1) * epoch :]
                counts.add(len(got))
                seen += got
            assert len(seen) == len(set(seen)) == usable, f"n {n}, micro {micro}, epoch {epoch}"
            assert len(counts) == 1


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_whole_micro_batches_are_dealt_by_global_index(tmp_path, micro, windows):
    """The rank's k-th batch is global micro-batch rank + world x k: the same rows in the same order as batch
    number global_batch_index(k) of a single process, so per-micro-batch draws can be seeded by that index."""
    n = 2 * 3 * 5 * 7 * micro + micro  # one micro-batch more than every world size here can use
    data = write_dataset(tmp_path / "d", n, rows_per_group=5)
    single = PackedLoader([data], block_size=B, micro_batch_size=micro, seed=4, prefetch=0)
    reference = [ids(next(single)) for _ in range(n // micro)]
    for world in (2, 3, 5, 7):
        for rank in (0, world - 1):
            loader = PackedLoader([data], block_size=B, micro_batch_size=micro, rank=rank, world_size=world, seed=4)
            for k in range(len(loader)):
                got = ids(next(loader))
                assert loader.global_batch_index() == loader.global_batch_index(k) == rank + world * k
                assert got == reference[rank + world * k], f"world {world} rank {rank} batch {k}"


def test_version_2_states_still_resume(tmp_path):
    """A loader state written before micro-batch dealing (version 2) resumes: exactly at micro-batch 1 (the
    order did not change there), from the same epoch and row counts at larger micro-batches."""
    data = write_dataset(tmp_path / "d", 120)
    for micro in (1, 4):
        kw = dict(block_size=B, micro_batch_size=micro, rank=1, world_size=2, seed=7, prefetch=0)
        ref = PackedLoader([data], **kw)
        expected = [ids(next(ref)) for _ in range(20)]
        state = {**ref.state_dict(), "batches": 5, "positions": [5 * micro], "epochs": [0], "version": 2,
                 "window": loader_module.WINDOW_TOKENS // (B + 1)}  # fmt: skip
        resumed = PackedLoader([data], **kw)
        resumed.load_state_dict(state)
        assert resumed.step == 5 and resumed.state_dict()["version"] == loader_module.STATE_VERSION
        assert [ids(next(resumed)) for _ in range(15)] == expected[5:]
        with pytest.raises(UserError, match="world_size"):
            PackedLoader([data], **{**kw, "world_size": 4, "rank": 0}).load_state_dict(state)


EXIT_SCRIPT = """
import sys
from recpre.data.loader import PackedLoader
loader = PackedLoader([sys.argv[1]], block_size=256, micro_batch_size=1, prefetch=200)
for _ in range(2):
    next(loader)
print("done", flush=True)
"""


def test_an_unclosed_loader_lets_the_process_exit_cleanly(tmp_path):
    """Issue 19.5: a program that iterates a loader and exits without close() exited with 134 (`terminate
    called without an active exception`): the prefetch thread was still inside torch/pyarrow at finalization."""
    folder = tmp_path / "d"
    folder.mkdir()
    w = PackedWriter(folder, 256, meta={"eos_id": EOS, "pad_id": PAD})
    w.add_rows(np.random.default_rng(0).integers(3, 4000, size=(8192, 257), dtype=np.int32))
    w.close()
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(folder)], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
        assert out.returncode == 0 and "done" in out.stdout, out.stderr
        assert "terminate called" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr


@pytest.mark.parametrize("world", [2, 3])
def test_uneven_rows_equal_batch_counts(tmp_path, world, windows):
    n = 101  # not divisible: the remainder is skipped so that ranks agree on the batch count
    data = write_dataset(tmp_path / "d", n)
    lengths, seen = set(), []
    for rank in range(world):
        loader = PackedLoader([data], block_size=B, micro_batch_size=4, rank=rank, world_size=world, num_epochs=1)
        batches = list(loader)
        lengths.add(len(batches))
        assert len(batches) == len(loader) == (n // world) // 4
        seen += [i for b in batches for i in ids(b)]
    assert len(lengths) == 1
    assert len(seen) == len(set(seen))
    assert n - len(seen) < world * 4


def test_shuffled_per_epoch_and_seed(tmp_path, windows):
    data = write_dataset(tmp_path / "d", 192)
    a = PackedLoader([data], block_size=B, micro_batch_size=4, seed=0)
    e0, e1 = epoch_ids(a), epoch_ids(a)
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert e0 != sorted(e0)
    b = PackedLoader([data], block_size=B, micro_batch_size=4, seed=1)
    assert epoch_ids(b) != e0
    c = PackedLoader([data], block_size=B, micro_batch_size=4, seed=0, prefetch=0)
    assert epoch_ids(c) == e0  # prefetch does not change the order


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_identical(tmp_path, prefetch, windows):
    d1 = write_dataset(tmp_path / "a", 120)
    d2 = write_dataset(tmp_path / "b", 56, offset=1000)
    for weights in (None, [0.6, 0.4]):
        kw = dict(block_size=B, micro_batch_size=4, rank=1, world_size=2, seed=7, weights=weights, prefetch=prefetch)
        ref = PackedLoader([d1, d2], **kw)
        expected = [next(ref) for _ in range(40)]  # crosses epoch boundaries
        run = PackedLoader([d1, d2], **kw)
        for _ in range(13):
            next(run)
        buf = io.BytesIO()
        torch.save(run.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        run.close()
        resumed = PackedLoader([d1, d2], **kw)
        resumed.load_state_dict(state)
        assert resumed.step == 13
        for i in range(13, 40):
            x, y = next(resumed)
            assert torch.equal(x, expected[i][0]) and torch.equal(y, expected[i][1]), f"batch {i}"
        # the state is the same on every rank: rank 0's copy resumes rank 1
        other = PackedLoader([d1, d2], **{**kw, "rank": 0})
        for _ in range(13):
            next(other)
        assert other.state_dict() == state


def test_state_mismatch_is_user_error(tmp_path):
    data = write_dataset(tmp_path / "d", 96)
    state = PackedLoader([data], block_size=B, micro_batch_size=4, world_size=2).state_dict()
    with pytest.raises(UserError, match="world_size"):
        PackedLoader([data], block_size=B, micro_batch_size=4, world_size=4).load_state_dict(state)
    with pytest.raises(UserError, match="format version 1 .* reads versions 2, 3"):
        PackedLoader([data], block_size=B, micro_batch_size=4, world_size=2).load_state_dict({**state, "version": 1})


def test_mixture_proportions(tmp_path):
    a = write_dataset(tmp_path / "a", 64, fill=5)
    b = write_dataset(tmp_path / "b", 64, fill=6)
    loader = PackedLoader([a, b], block_size=B, micro_batch_size=8, weights=[3, 1], seed=2)
    n_batches = 250
    rows_a = sum(int((next(loader)[0][:, 1] == 5).sum()) for _ in range(n_batches))
    n = n_batches * 8
    p = 0.75
    assert abs(rows_a / n - p) < 4 * (p * (1 - p) / n) ** 0.5
    assert min(s.epoch for s in loader._streams) >= 1  # both sources cycled
    with pytest.raises(TypeError):
        len(loader)


def test_labels_shift_and_pad_mask(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    w = PackedWriter(folder, B, meta={"eos_id": EOS, "pad_id": PAD})
    w.add_tokens(np.array([7, 8, EOS, 9, 9, 9, EOS, 11, 12, EOS, 13], dtype=np.int32))  # 11 tokens: 2nd row padded
    w.close()
    loader = PackedLoader([folder], block_size=B, micro_batch_size=1, prefetch=0)
    assert loader.eos_id == EOS and loader.pad_id == PAD
    rows = sorted(([next(loader) for _ in range(2)]), key=lambda b: -b[0][0, 0].item())  # the row starting with 7 first
    x, y = rows[0]
    assert x[0].tolist() == [7, 8, EOS, 9, 9, 9, EOS, 11]
    assert y[0].tolist() == [8, EOS, 9, 9, 9, EOS, 11, 12]
    x2, y2 = rows[1]
    assert x2[0].tolist() == [EOS, 13] + [PAD] * 6 and y2[0].tolist() == [13] + [-100] * 7
    assert x.dtype == y.dtype == torch.int64
    assert document_ids(x, EOS)[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert loader.document_ids(x).tolist() == document_ids(x, EOS).tolist()
    assert document_position_ids(x, EOS)[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]


def test_bad_inputs(tmp_path):
    kw = dict(block_size=B, micro_batch_size=2)
    with pytest.raises(UserError, match="nope.*does not exist"):
        PackedLoader([tmp_path / "nope"], **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty.*no .parquet"):
        PackedLoader([tmp_path / "empty"], **kw)
    good = write_dataset(tmp_path / "good", 64, rows_per_shard=64)
    raw = (good / "part-00000.parquet").read_bytes()
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "t.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="t.parquet.*corrupted or truncated"):
        PackedLoader([tmp_path / "trunc"], **kw)
    # corrupted data pages behind an intact footer: reported when the row group is read, naming the file
    corrupt = bytearray(raw)
    corrupt[4:2000] = b"\xff" * 1996
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "c.parquet").write_bytes(bytes(corrupt))
    loader = PackedLoader([tmp_path / "corrupt"], **kw)
    with pytest.raises(UserError, match="c.parquet"):
        for _ in range(len(loader)):
            next(loader)
    pq.write_table(pa.table({"tokens": [[1] * (B + 1)] * 4}), tmp_path / "col.parquet")
    with pytest.raises(UserError, match="col.parquet.*no column 'input_ids'"):
        PackedLoader([tmp_path / "col.parquet"], **kw)
    with pytest.raises(UserError, match="part-00000.parquet.*rows of 9 tokens but block_size 16"):
        PackedLoader([good], block_size=16, micro_batch_size=2)
    pq.write_table(pa.table({"input_ids": [[1] * (B + 1)] * 3 + [[1] * B]}), tmp_path / "ragged.parquet")
    with pytest.raises(UserError, match="ragged.parquet.*row of 8 tokens"):
        lo = PackedLoader([tmp_path / "ragged.parquet"], **kw)
        next(lo)
    with pytest.raises(UserError, match="fewer than world_size"):
        PackedLoader([good], block_size=B, micro_batch_size=64, world_size=2)
    with pytest.raises(UserError, match="weights"):
        PackedLoader([good, good], **kw, weights=[1.0])


def test_foreign_list_column_is_accepted(tmp_path):
    rows = [[i] + [3] * B for i in range(32)]
    pq.write_table(pa.table({"input_ids": pa.array(rows, type=pa.list_(pa.int64()))}), tmp_path / "f.parquet",
                   row_group_size=8)  # fmt: skip
    loader = PackedLoader([tmp_path / "f.parquet"], block_size=B, micro_batch_size=4, num_epochs=1)
    assert sorted(i for x, _ in loader for i in x[:, 0].tolist()) == list(range(32))
