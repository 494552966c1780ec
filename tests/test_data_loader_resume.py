"""The loader refuses a data position saved under another seed, block size or mixture, through its public
contract only (state_dict / load_state_dict): how rows are dealt to ranks may change, this promise may not.

A position restored under the settings it was saved with continues exactly; one saved under other settings is
refused with a UserError naming the setting, and the loader is left as it was (its own first batch next).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recpre.data.loader import PackedLoader
from recpre.data.packed import PackedWriter
from recpre.errors import UserError

ROWS = 192


def write_dataset(folder, block: int, offset: int):
    """ROWS rows of `block` + 1 tokens; row i starts with the unique id offset + i + 10."""
    folder.mkdir(parents=True)
    writer = PackedWriter(folder, block, meta={"eos_id": 1, "pad_id": 2, "vocab_size": 10**6}, rows_per_shard=64)
    rows = np.full((ROWS, block + 1), 5, dtype=np.int32)
    rows[:, 0] = np.arange(ROWS) + offset + 10
    writer.add_rows(rows)
    writer.close()
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader-resume")
    return {
        "a8": write_dataset(root / "a8", 8, 0),
        "b8": write_dataset(root / "b8", 8, 1000),
        "a16": write_dataset(root / "a16", 16, 0),
        "b16": write_dataset(root / "b16", 16, 1000),
    }


def loader(data, *, seed=1, block=8, weights=(1.0, 1.0)) -> PackedLoader:
    paths = [data[f"a{block}"], data[f"b{block}"]]
    return PackedLoader(paths, block_size=block, micro_batch_size=4, seed=seed, weights=weights, prefetch=0)


def batches(it: PackedLoader, n: int) -> list[torch.Tensor]:
    return [next(it)[0] for _ in range(n)]


def test_a_position_restored_under_the_same_settings_continues_exactly(data):
    saved = loader(data)
    batches(saved, 3)
    state = saved.state_dict()
    resumed = loader(data)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(batches(saved, 4), batches(resumed, 4)))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seed": 2}, r"seed\W.*\b1\b.*\b2\b"),  # the key, the saved value, this run's
        ({"block": 16}, r"block_size\W.*\b8\b.*\b16\b"),
        ({"weights": (1.0, 3.0)}, r"weights\W.*1\.0, 1\.0.*1\.0, 3\.0"),
        ({"weights": None}, r"resume with the same data"),  # one source of all rows: sizes differ first
    ],
    ids=["seed", "block-size", "mixture-weights", "no-mixture"],
)
def test_a_position_saved_under_another_seed_block_size_or_mixture_is_refused(data, change, named):
    saved = loader(data)
    batches(saved, 3)
    state = saved.state_dict()
    other, fresh = loader(data, **change), loader(data, **change)
    with pytest.raises(UserError, match=named):
        other.load_state_dict(state)
    # refused whole: the loader is untouched and starts where a fresh one does
    assert all(torch.equal(a, b) for a, b in zip(batches(other, 2), batches(fresh, 2)))


def _ranks(path, world, **kw):
    return [
        PackedLoader(path, block_size=8, micro_batch_size=2, rank=r, world_size=world, prefetch=0, **kw)
        for r in range(world)
    ]


@pytest.mark.parametrize(("saved", "now"), [(2, 3), (3, 1), (1, 2)])
def test_a_position_saved_at_one_world_size_continues_at_another(data, saved, now):
    """The global micro-batch order goes on from the same global micro-batch whatever the new world size."""
    path = data["a8"]
    reference = _ranks(path, 6)  # global micro-batch g is rank g % 6's batch g // 6
    expected = [next(reference[g % 6])[0] for g in range(12)]  # global micro-batches 0 .. 11
    old = _ranks(path, saved)
    for _ in range(6 // saved):  # 6 global micro-batches taken
        for it in old:
            next(it)
    state = old[0].state_dict()
    new = _ranks(path, now)
    for it in new:
        it.load_state_dict_from_world(state, saved)
    got = [next(new[g % now])[0] for g in range(6)]
    for g, batch in enumerate(got):
        assert torch.equal(batch, expected[6 + g]), f"global micro-batch {6 + g}"


def test_a_mixture_position_is_refused_at_another_world_size(data):
    old = PackedLoader(
        [data["a8"], data["b8"]], block_size=8, micro_batch_size=2, rank=0, world_size=2, weights=[1.0, 1.0], prefetch=0
    )
    next(old)
    new = PackedLoader(
        [data["a8"], data["b8"]], block_size=8, micro_batch_size=2, rank=0, world_size=1, weights=[1.0, 1.0], prefetch=0
    )
    with pytest.raises(UserError, match="cannot be continued exactly by 1: a data mixture"):
        new.load_state_dict_from_world(old.state_dict(), 2)
