"""Sources, shards and the batch loader: contents, determinism, rank disjointness, resumption, and the shards'
integrity checks (sizes, largest ids, block checksums) against random bytes written into real files."""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_lm.data import EvalBatches, ShardedTokens, TrainBatches, check_tokenizer, iter_documents, load_manifest
from dist_lm.data.shards import BLOCK_BYTES, prepare_shards, shard_record, verify_shards
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


# ----------------------------------------------------------------------------------------------
# Bad rows in a source: one error naming the file, the line and the field


@pytest.mark.parametrize("row, shown", [({"text": None}, "is null"), ({"text": 42}, "is a int ('42')"),
                                        ({"text": ["a"]}, "is a list"), ([1, 2], "is a JSON list, not an object")])
def test_jsonl_rows_without_text_name_the_line(tmp_path, row, shown):
    src = tmp_path / "docs.jsonl"
    rows = [json.dumps({"text": d}) for d in DOCS[:5]]
    rows.insert(3, json.dumps(row))
    src.write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError) as err:
        list(iter_documents(str(src), "train", val_fraction=0.2))
    assert f"{src}:4" in str(err.value) and shown in str(err.value) and "'text'" in str(err.value)


def test_parquet_null_text_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["a story", None, "another"]}), src)
    with pytest.raises(UserError, match=r"docs.parquet row 1: field 'body' \(data.text_field\) is null"):
        list(iter_documents(str(src), "train", text_field="body", val_fraction=0.34))


# ----------------------------------------------------------------------------------------------
# Shard integrity


def scribble(path: Path, offset: int, count: int) -> None:
    """Random bytes over [offset, offset + count) of a file, its size unchanged (bit rot, a bad copy)."""
    data = bytearray(path.read_bytes())
    new = os.urandom(count)
    while new == bytes(data[offset:offset + count]):
        new = os.urandom(count)
    data[offset:offset + count] = new
    path.write_bytes(bytes(data))


def write_data_dir(root: Path, shards: list[np.ndarray], *, vocab_size: int = 1000, block_bytes: int = 64,
                   fingerprint: str = "f" * 64, version: int = 2) -> Path:
    """A train split of hand-made uint16 shards and an honest manifest (what prepare_shards writes) with
    small checksum blocks, so that a few hundred tokens span many blocks."""
    (root / "train").mkdir(parents=True)
    entries = []
    for i, tokens in enumerate(shards):
        name = f"train/shard_{i:06d}.bin"
        tokens.astype(np.uint16).tofile(root / name)
        entries.append({"file": name, **shard_record(tokens.astype(np.uint16), block_bytes)})
    manifest = {"format_version": version, "tokenizer_dir": "tok", "tokenizer_fingerprint": fingerprint,
                "vocab_size": vocab_size, "dtype": "uint16",
                "checksum": {"algorithm": "crc32", "block_bytes": block_bytes},
                "splits": {"train": {"num_documents": 1, "num_tokens": sum(len(t) for t in shards), "shards": entries}}}
    if version == 1:
        del manifest["checksum"]
        manifest["splits"]["train"]["shards"] = [{"file": e["file"], "num_tokens": e["num_tokens"]} for e in entries]
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_manifest_records_bytes_largest_id_and_block_crcs(shards):
    manifest = load_manifest(shards)
    assert manifest["format_version"] == 2 and manifest["checksum"] == {"algorithm": "crc32",
                                                                        "block_bytes": BLOCK_BYTES}
    for split in ("train", "val"):
        for entry in manifest["splits"][split]["shards"]:
            data = (shards / entry["file"]).read_bytes()
            tokens = np.frombuffer(data, dtype=np.uint16)
            assert entry["num_bytes"] == len(data) and entry["max_token_id"] == tokens.max()
            crcs = [zlib.crc32(data[i:i + BLOCK_BYTES]) for i in range(0, len(data), BLOCK_BYTES)]
            assert entry["crc32"] == "".join(f"{c:08x}" for c in crcs)


def test_random_bytes_in_a_shard_are_named_when_read(shards):
    """Lazily: the damaged shard opens (its size is right), reads elsewhere work, and the first read of the damaged
    block names the file and its bytes instead of returning garbage or ids out of range."""
    damaged = shards / "train" / "shard_000001.bin"  # 100-token shards: tokens 100-199 of the split
    scribble(damaged, 50, 40)
    train = ShardedTokens.open(shards, "train")
    assert train.read_rows(np.array([0, 10]), 50).shape == (2, 50)  # shard 0 only
    with pytest.raises(UserError) as err:
        train.read_rows(np.array([0, 150]), 20)
    assert str(err.value).startswith(f"shard {damaged}, bytes 0-199: checksum mismatch (crc32 ")
    assert "prepare_data.py --overwrite" in str(err.value)
    with pytest.raises(UserError, match="shard_000001.bin, bytes 0-199: checksum mismatch"):
        ShardedTokens.open(shards, "train", verify="full")  # the full check finds it at open
    with pytest.raises(UserError, match=r"1 damaged block\(s\) in .*shard_000001.bin, bytes 0-199"):
        verify_shards(shards)


def test_blocks_are_checked_once_each_and_the_error_names_the_block(tmp_path):
    tokens = np.arange(1000) % 900
    root = write_data_dir(tmp_path / "d", [tokens], vocab_size=900, block_bytes=64)  # 32 tokens a block
    scribble(root / "train" / "shard_000000.bin", 64 * 20 + 10, 4)  # inside block 20: bytes 1280-1343
    train = ShardedTokens.open(root, "train")
    rows = train.read_rows(np.array([0, 100, 600]), 40)
    assert (rows == np.stack([tokens[s:s + 40] for s in (0, 100, 600)])).all()
    checked = train.checks[0].checked
    assert checked.sum() == 6 and checked[[0, 1, 3, 4, 18, 19]].all()  # exactly the blocks read
    with pytest.raises(UserError, match=r"shard_000000.bin, bytes 1,280-1,343: checksum mismatch"):
        train.read_rows(np.array([630]), 20)  # tokens 630-649 start in block 19 and end in block 20
    assert verify_shards(write_data_dir(tmp_path / "clean", [tokens], vocab_size=900)) == {"shards": 1, "bytes": 2000}


def test_ids_beyond_the_vocabulary_are_refused_at_open(tmp_path):
    tokens = np.arange(500) % 300
    tokens[123] = 1000  # an id the tokenizer (vocab 1000: ids 0..999) never makes
    root = write_data_dir(tmp_path / "d", [np.arange(200) % 300, tokens], vocab_size=1000)
    with pytest.raises(UserError) as err:
        ShardedTokens.open(root, "train")
    assert str(err.value).startswith(f"shard {root / 'train' / 'shard_000001.bin'} holds token ids up to 1000 ")
    assert "beyond the vocabulary's 1000 ids (0..999)" in str(err.value)
    ok_root = write_data_dir(tmp_path / "ok", [np.arange(500) % 300])
    with pytest.raises(UserError, match="holds token ids up to 299 .*beyond the vocabulary's 200 ids"):
        ShardedTokens.open(ok_root, "train", vocab_size=200)  # a smaller limit from the caller (the model's)


def test_format_1_manifest_reads_with_a_warning_and_bad_ids_never_reach_the_model(tmp_path):
    tokens = np.arange(500) % 300
    tokens[321] = 5000
    root = write_data_dir(tmp_path / "d", [tokens], vocab_size=1000, version=1)
    with pytest.warns(RuntimeWarning, match="format-1 manifest .*re-prepare"):
        train = ShardedTokens.open(root, "train")
    assert train.read_rows(np.array([0]), 300).shape == (1, 300)
    with pytest.raises(UserError) as err:
        train.read_rows(np.array([0, 300]), 30)
    assert str(err.value).startswith(f"shard {root / 'train' / 'shard_000000.bin'} holds token id 5000 at token 321 "
                                     "(byte 642), beyond the vocabulary's 1000 ids")
    batches = TrainBatches(train, seq_len=50, micro_batch=9, grad_accum=1, rank=0, world_size=1, seed=0)
    with pytest.raises(UserError, match="token id 5000 at token 321"):  # the loader's batch: every window once
        batches.batch(0, 0)
    with pytest.raises(UserError, match="records no checksums"):
        verify_shards(root)


@pytest.mark.parametrize("key", ["tokenizer_fingerprint", "vocab_size", "dtype", "splits", "checksum"])
def test_manifest_missing_a_key_names_it(tmp_path, key):
    root = write_data_dir(tmp_path / "d", [np.arange(100)])
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest[key]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"manifest.json has no {key} .*prepare_data.py --overwrite"):
        load_manifest(root)


def test_manifest_shard_entry_missing_a_key_and_random_bytes(tmp_path):
    root = write_data_dir(tmp_path / "d", [np.arange(100)])
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["splits"]["train"]["shards"][0]["crc32"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"has no splits.train.shards\[0\].crc32 "):
        load_manifest(root)
    (root / "manifest.json").write_bytes(os.urandom(100) + b"\xff")
    with pytest.raises(UserError, match="manifest.json is not valid JSON"):
        load_manifest(root)
