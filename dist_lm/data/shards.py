"""Token shards: documents -> flat `.bin` files of token ids + `manifest.json`; a memmap reader.

Layout of a data directory:
    manifest.json            format version, tokenizer fingerprint, dtype, token and document counts
    train/shard_000000.bin   raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    val/shard_000000.bin

Design decisions:
- Each document is followed by the tokenizer's `<|endoftext|>` id, so windows that straddle two
  documents see the boundary the model must learn.
- Shards are plain arrays (no header): `np.memmap` reads them with no copy, and any tool can.
- The directory is written under a temporary name and renamed at the end, so an interrupted run
  never leaves a half-written data dir that looks complete. An existing one is never overwritten
  unless asked.
- The manifest records the tokenizer fingerprint; training refuses shards made with another
  tokenizer (`check_tokenizer`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_lm.data.sources import SPLITS, iter_documents
from dist_lm.errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MB of uint16 per shard


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def prepare_shards(
    source: str,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    val_fraction: float = 0.05,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_workers: int | None = None,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Tokenize a source into `out_dir/{train,val}/shard_*.bin` + manifest.json; returns the manifest."""
    from dist_lm.tokenizer import load_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds prepared shards; pass --overwrite to rebuild them "
                              "or choose another output directory")
    if out_dir.exists() and not (out_dir / MANIFEST).exists() and any(out_dir.iterdir()):
        # even with overwrite: replacing it would delete whatever the directory holds
        raise FileExistsError(f"{out_dir} exists and is not a shard directory; choose an empty or new directory")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens={shard_tokens} must be positive")
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    start = time.perf_counter()
    splits = {}
    try:
        for split in SPLITS:
            docs = iter_documents(source, split, text_field=text_field, val_fraction=val_fraction)
            splits[split] = _write_split(docs, tokenizer, tmp_dir, split, dtype, shard_tokens, num_workers)
            log(f"  {split}: {splits[split]['num_documents']:,} documents, {splits[split]['num_tokens']:,} tokens")
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "tokenizer_dir": str(tokenizer_dir),
            "tokenizer_fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "dtype": dtype.name,
            "splits": splits,
            "seconds": round(time.perf_counter() - start, 2),
        }
        (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return manifest


def _batched(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_split(docs, tokenizer, root: Path, split: str, dtype, shard_tokens: int, num_workers) -> dict:
    (root / split).mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    buffer = np.empty(shard_tokens, dtype=dtype)
    filled = 0
    num_docs = 0
    eot = tokenizer.eot_id

    def flush() -> None:
        nonlocal filled
        name = f"{split}/shard_{len(shards):06d}.bin"
        buffer[:filled].tofile(root / name)
        shards.append({"file": name, "num_tokens": int(filled)})
        filled = 0

    for batch in _batched(docs, 512):
        for ids in tokenizer.encode_batch(batch, num_workers=num_workers):
            ids.append(eot)
            num_docs += 1
            pos = 0
            while pos < len(ids):
                take = min(len(ids) - pos, shard_tokens - filled)
                buffer[filled:filled + take] = ids[pos:pos + take]
                filled += take
                pos += take
                if filled == shard_tokens:
                    flush()
    if filled:
        flush()
    return {"num_documents": num_docs, "num_tokens": sum(s["num_tokens"] for s in shards), "shards": shards}


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an old `target` is moved aside first and removed only after."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def load_manifest(data_dir: str | Path) -> dict:
    """Read and check manifest.json of a shard directory."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no token shards at {data_dir} (missing {MANIFEST}); make them with "
                                f"`python launch/prepare_data.py --config <your config>`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}); rebuild the shards with "
                        "launch/prepare_data.py") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format_version {manifest.get('format_version')!r}, this dist_lm reads "
                        f"{FORMAT_VERSION}; rebuild the shards with launch/prepare_data.py")
    return manifest


def check_tokenizer(manifest: dict, fingerprint: str, data_dir: str | Path) -> None:
    """Refuse shards made with a tokenizer other than the one the run uses."""
    if manifest["tokenizer_fingerprint"] != fingerprint:
        raise UserError(
            f"the shards in {data_dir} were made with tokenizer {manifest['tokenizer_dir']} "
            f"(fingerprint {manifest['tokenizer_fingerprint'][:12]}), not the configured one "
            f"(fingerprint {fingerprint[:12]}); set data.tokenizer_dir to the tokenizer the shards were made with, "
            "or rebuild them with launch/prepare_data.py --overwrite"
        )


@dataclass
class ShardedTokens:
    """All shards of one split viewed as one flat array of token ids (memory-mapped, read-only)."""

    arrays: list[np.ndarray]
    offsets: np.ndarray  # (num_shards + 1,) start of each shard in the flat view

    @classmethod
    def open(cls, data_dir: str | Path, split: str, manifest: dict | None = None) -> ShardedTokens:
        manifest = manifest if manifest is not None else load_manifest(data_dir)
        if split not in manifest["splits"]:
            raise UserError(f"{data_dir} has no split {split!r}; it has {sorted(manifest['splits'])}")
        dtype = np.dtype(manifest["dtype"])
        arrays = []
        for shard in manifest["splits"][split]["shards"]:
            path = Path(data_dir) / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in the manifest is missing; rebuild with "
                                        "launch/prepare_data.py --overwrite")
            if path.stat().st_size != shard["num_tokens"] * dtype.itemsize:
                raise UserError(f"shard {path} has {path.stat().st_size} bytes, the manifest says "
                                f"{shard['num_tokens']} {dtype.name} tokens; rebuild with "
                                "launch/prepare_data.py --overwrite")
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        offsets = np.cumsum([0] + [len(a) for a in arrays])
        return cls(arrays, offsets)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read_rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows [start, start + length) for each start, as one (len(starts), length) int64 array.

        One fancy-indexed gather per shard for the rows inside it (a batch is read with a few numpy calls
        instead of one Python call per row: host time the training step waits for); rows crossing a shard
        boundary go through read()."""
        starts = np.asarray(starts, dtype=np.int64)
        assert starts.size == 0 or (starts.min() >= 0 and starts.max() + length <= len(self)), (starts, length)
        out = np.empty((len(starts), length), dtype=np.int64)
        shard = np.searchsorted(self.offsets, starts, side="right") - 1
        local = starts - self.offsets[shard]
        inside = local + length <= self.offsets[shard + 1] - self.offsets[shard]
        cols = np.arange(length, dtype=np.int64)
        for s in np.unique(shard[inside]):
            rows = np.nonzero(inside & (shard == s))[0]
            out[rows] = self.arrays[int(s)][local[rows, None] + cols]
        for r in np.nonzero(~inside)[0]:
            out[r] = self.read(int(starts[r]), length)
        return out

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, crossing shard boundaries when needed."""
        assert 0 <= start and start + length <= len(self), (start, length, len(self))
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            lo = start + filled - int(self.offsets[shard])
            take = min(length - filled, len(self.arrays[shard]) - lo)
            out[filled:filled + take] = self.arrays[shard][lo:lo + take]
            filled += take
            shard += 1
        return out
