"""Sources, shards and the batch loader: contents, determinism, rank disjointness, resumption."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_lm.data import EvalBatches, ShardedTokens, TrainBatches, check_tokenizer, iter_documents, load_manifest
from dist_lm.data.shards import prepare_shards
from dist_lm.errors import UserError
from dist_lm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tokenizers" / "tinystories-10k"


def write_docs(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(f"{d}\n<|endoftext|>\n" for d in docs))
    return path


DOCS = [f"Story {i}: Tom saw {i} red balls and Sam said hello {i * 7}." for i in range(40)]


def test_txt_documents_and_split(tmp_path):
    src = write_docs(tmp_path / "stories.txt", DOCS)
    train = list(iter_documents(str(src), "train", val_fraction=0.1))
    val = list(iter_documents(str(src), "val", val_fraction=0.1))
    assert train == DOCS[:36] and val == DOCS[36:]  # the last 10% of the documents is the validation split


def test_bundled_sample_split():
    train = list(iter_documents("bundled:tinystories", "train", val_fraction=0.05))
    val = list(iter_documents("bundled:tinystories", "val", val_fraction=0.05))
    assert len(train) + len(val) > 1000 and len(val) == round(0.05 * (len(train) + len(val)))
    assert not any("<|endoftext|>" in d for d in train + val)
    assert train[0].startswith("Once upon a time")


def test_jsonl_source_and_errors(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)))
    assert list(iter_documents(str(src), "train", val_fraction=0.5)) == DOCS[:20]
    with pytest.raises(ValueError, match="no field 'body'"):
        list(iter_documents(str(src), "train", text_field="body"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        iter_documents(str(tmp_path / "missing.txt"), "train")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="accepted: .txt, .jsonl, .parquet"):
        iter_documents(str(tmp_path / "x.csv"), "train")


def test_undecodable_local_files_are_user_errors(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    with pytest.raises(UserError, match=r"latin1.txt is not UTF-8 text .* convert it to UTF-8"):
        list(iter_documents(str(latin1), "train", val_fraction=0.5))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(UserError, match="broken.parquet is not a readable parquet file"):
        list(iter_documents(str(broken), "train", val_fraction=0.5))


def test_dataset_directory_goes_through_the_hub_code(tmp_path):
    """A local dataset directory takes the same `datasets` streaming path as a hub name (offline here)."""
    with_val, train_only = tmp_path / "with_val", tmp_path / "train_only"
    for directory, splits in ((with_val, {"train": 10, "validation": 3}), (train_only, {"train": 40})):
        directory.mkdir()
        for split, n in splits.items():
            rows = [json.dumps({"text": f"{split} {i}", "n": i}) for i in range(n)]
            (directory / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    assert list(iter_documents(str(with_val), "val")) == ["validation 0", "validation 1", "validation 2"]
    assert len(list(iter_documents(str(with_val), "train"))) == 10
    # No validation split: every 20th document (val_fraction 0.05) is held out, the rest trains.
    val = list(iter_documents(str(train_only), "val", val_fraction=0.05))
    train = list(iter_documents(str(train_only), "train", val_fraction=0.05))
    assert val == ["train 19", "train 39"] and len(train) == 38 and not set(val) & set(train)
    with pytest.raises(ValueError, match="no column 'body'"):
        next(iter(iter_documents(str(with_val), "train", text_field="body")))


def test_unreachable_hub_dataset_is_one_clear_error():
    code = ("from dist_lm.data import iter_documents\n"
            "try:\n    next(iter(iter_documents('roneneldan/TinyStories', 'train')))\n"
            "except ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fail fast instead of retrying the network
    assert "could not reach dataset 'roneneldan/TinyStories' on the hub" in out.stdout
    assert "pass a local .txt/.jsonl/.parquet file" in out.stdout


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


@pytest.fixture
def shards(tmp_path, tokenizer):
    src = write_docs(tmp_path / "stories.txt", DOCS)
    out = tmp_path / "shards"
    prepare_shards(str(src), TOKENIZER, out, val_fraction=0.1, shard_tokens=100, log=lambda *_: None)
    return out


def test_shards_hold_every_document_then_eot(shards, tokenizer):
    manifest = load_manifest(shards)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer_fingerprint"] == tokenizer.fingerprint()
    expected = [t for d in DOCS[:36] for t in tokenizer.encode(d) + [tokenizer.eot_id]]
    train = ShardedTokens.open(shards, "train")
    assert len(manifest["splits"]["train"]["shards"]) > 1  # 100-token shards: reads cross shard boundaries
    assert train.read(0, len(train)).tolist() == expected
    assert train.read(95, 10).tolist() == expected[95:105]
    assert manifest["splits"]["val"]["num_documents"] == 4


def test_prepare_refuses_to_overwrite(shards, tmp_path):
    before = (shards / "train" / "shard_000000.bin").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_shards(str(tmp_path / "stories.txt"), TOKENIZER, shards, log=lambda *_: None)
    assert (shards / "train" / "shard_000000.bin").read_bytes() == before


def test_shards_from_another_tokenizer_are_refused(shards):
    manifest = load_manifest(shards)
    with pytest.raises(ValueError, match="were made with tokenizer"):
        check_tokenizer(manifest, "0" * 64, shards)


def test_truncated_shard_is_detected(shards):
    path = shards / "train" / "shard_000000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="rebuild"):
        ShardedTokens.open(shards, "train")


def test_missing_manifest_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        load_manifest(tmp_path)


class ArrayTokens(ShardedTokens):
    """A ShardedTokens over an in-memory array whose value at i is i (windows are easy to identify)."""

    def __init__(self, n: int) -> None:
        super().__init__([np.arange(n, dtype=np.int64)], np.array([0, n]))


def loader(world: int = 1, rank: int = 0, batch: int = 4, accum: int = 1, seed: int = 0, n: int = 8 * 50 + 1):
    return TrainBatches(ArrayTokens(n), seq_len=8, micro_batch=batch, grad_accum=accum, rank=rank,
                        world_size=world, seed=seed)


def test_batches_are_shifted_windows():
    x, y = loader().batch(0, 0)
    assert x.shape == y.shape == (4, 8)
    assert (y == x + 1).all() and (x[:, 0] % 8 == 0).all()  # windows start on multiples of seq_len


def test_same_seed_same_batches_other_seed_other_batches():
    a, b, c = loader(seed=1), loader(seed=1), loader(seed=2)
    for step in range(5):
        assert (a.batch(step, 0)[0] == b.batch(step, 0)[0]).all()
    assert any((a.batch(s, 0)[0] != c.batch(s, 0)[0]).any() for s in range(5))


def test_ranks_are_disjoint_and_cover_the_global_batch():
    one = loader(world=1, batch=8)
    two = [loader(world=2, rank=r, batch=4) for r in range(2)]
    for step in range(6):
        ids = [set(t.window_ids(step, 0).tolist()) for t in two]
        assert not ids[0] & ids[1]
        assert ids[0] | ids[1] == set(one.window_ids(step, 0).tolist())


def test_accumulation_sees_the_same_global_batch():
    one = loader(batch=8, accum=1)
    accum = loader(batch=2, accum=4)
    for step in range(6):
        micro = np.concatenate([accum.window_ids(step, m) for m in range(4)])
        assert sorted(micro.tolist()) == sorted(one.window_ids(step, 0).tolist())


def test_read_rows_equals_read_across_shard_boundaries():
    # three shards of 10, 7 and 13 tokens; the value at flat position i is i
    tokens = ShardedTokens([np.arange(0, 10), np.arange(10, 17), np.arange(17, 30)], np.array([0, 10, 17, 30]))
    starts = np.array([0, 3, 8, 9, 10, 12, 16, 17, 22, 25, 2])  # inside, crossing one and two boundaries
    rows = tokens.read_rows(starts, 5)
    assert rows.dtype == np.int64 and rows.shape == (len(starts), 5)
    assert (rows == np.stack([tokens.read(int(s), 5) for s in starts])).all()
    assert (rows == starts[:, None] + np.arange(5)).all()
    assert (tokens.read_rows(np.array([0]), 30) == np.arange(30)).all()  # one row spanning all three shards


def test_window_ids_cross_epochs_like_the_per_position_rule():
    t = loader(batch=7)  # 50 windows: steps 7 and 14 straddle epoch boundaries
    for step in range(16):
        positions = range(step * 7, step * 7 + 7)
        expected = [t._order(p // 50)[p % 50] for p in positions]
        assert t.window_ids(step, 0).tolist() == expected


def test_each_epoch_visits_every_window_once():
    t = loader(batch=5)  # 50 windows, 10 steps an epoch
    seen = np.concatenate([t.window_ids(s, 0) for s in range(10)])
    assert sorted(seen.tolist()) == list(range(50))
    second = np.concatenate([t.window_ids(s, 0) for s in range(10, 20)])
    assert sorted(second.tolist()) == list(range(50)) and second.tolist() != seen.tolist()


def test_resume_with_another_global_batch_continues_the_order():
    full = loader(batch=4)
    order = np.concatenate([full.window_ids(s, 0) for s in range(6)])  # 24 windows
    half = loader(world=2, rank=0, batch=1)  # global batch 2 after a resume at step 3 (12 windows consumed)
    other = loader(world=2, rank=1, batch=1)
    for t in (half, other):
        t.resume_at(3, 12)
    resumed = np.concatenate([np.concatenate([half.window_ids(s, 0), other.window_ids(s, 0)]) for s in range(3, 9)])
    assert resumed.tolist() == order[12:].tolist()


def test_eval_batches_fixed_and_rank_split():
    tokens = ArrayTokens(8 * 10 + 1)
    evals = [EvalBatches(tokens, seq_len=8, micro_batch=2, num_batches=2, rank=r, world_size=2) for r in (0, 1)]
    ranks = [list(e) for e in evals]
    for e, first in zip(evals, ranks):  # the same windows at every evaluation
        assert all(torch.equal(a[0], b[0]) for a, b in zip(first, e))
    starts = sorted(int(x[0, 0]) // 8 for r in ranks for x, _ in r) + sorted(
        int(x[1, 0]) // 8 for r in ranks for x, _ in r)
    assert sorted(starts) == list(range(8))
