"""Token shards: documents -> flat `.bin` files of token ids + `manifest.json`; a memmap reader.

Layout of a data directory:
    manifest.json            format version, tokenizer fingerprint, vocab size, dtype, token and document
                             counts; per shard its size in bytes, largest token id and block checksums
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
  tokenizer (`check_tokenizer`), and a manifest missing a key is one error naming the file and the key.
- Integrity, checked where it is cheap (format 2 of the manifest):
  1) at open, each shard's size against the manifest, and its largest token id (recorded at write time, when
     it costs one max over a buffer already in memory) against the vocabulary: ids the model has no row for,
     or the tokenizer never made, are refused before the first step, naming the shard;
  2) lazily, the content: a CRC-32 per 256 KiB block is recorded at write time, and each block is checked the
     first time a batch reads from it, so random bytes in a shard are "shard X, bytes A-B: checksum mismatch"
     instead of an IndexError in the embedding or a silently wrong loss. A full check at open would read every
     shard on every rank at every start (minutes for an OpenWebText-sized split, per rank); the lazy one costs
     the same bytes once in total, spread over the first steps, and nothing on a resume that never reads a
     block. 256 KiB keeps the first read of a 1k-token window to about 0.1 ms of CRC (zlib: ~2 GB/s) and the
     manifest to ~32 KB per GB of tokens; CRC-32 rather than a cryptographic hash because it guards against
     accidents (bit rot, a bad copy), not an attacker, and is the fastest check in the standard library.
  3) on demand, everything: `verify="full"` at open, or `verify_shards` (`launch/prepare_data.py --verify DIR`),
     which reports every damaged block.
  Every batch is also checked against the vocabulary (one max over the batch), so no id out of range reaches
  the model even from an unchecked (format-1) manifest; the error names the shard file and the offset.
- Format-1 manifests (no sizes in bytes, checksums or largest ids) are still read, unverified, with one warning
  that says how to get the checks (re-prepare: tokenization is deterministic, so a resumed run sees the same
  tokens).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_lm.data.sources import SPLITS, iter_documents
from dist_lm.errors import StorageError, UserError
from dist_lm.storage import SPACE_ERRNOS, format_bytes, free_space, storage_errno
from dist_lm.warn import warn_once

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no num_bytes, max_token_id or checksums
DEFAULT_SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MB of uint16 per shard
BLOCK_BYTES = 1 << 18  # 256 KiB per CRC-32 (see the module docstring); a multiple of every dtype's itemsize
# keys load_manifest requires, by format version; a shard entry's keys below
MANIFEST_KEYS = ("format_version", "tokenizer_fingerprint", "vocab_size", "dtype", "splits")
SHARD_KEYS = {1: ("file", "num_tokens"), 2: ("file", "num_tokens", "num_bytes", "max_token_id", "crc32")}
REBUILD = "rebuild the shards with launch/prepare_data.py --overwrite"


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
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    start = time.perf_counter()
    splits = {}
    try:
        with _writing():
            out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
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
            "checksum": {"algorithm": "crc32", "block_bytes": BLOCK_BYTES},
            "splits": splits,
            "seconds": round(time.perf_counter() - start, 2),
        }
        with _writing():
            (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
            _replace_dir(tmp_dir, out_dir)
    except _WriteFailed as failed:
        code = storage_errno(failed.error)
        if code is None:
            raise failed.error from None
        raise _storage_error(code, tmp_dir, out_dir) from failed.error
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return manifest


class _WriteFailed(Exception):
    """An OSError of writing the shards, as opposed to reading the source (an unreadable source file is not the
    output directory's fault)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


@contextmanager
def _writing() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _WriteFailed(exc) from exc


def _storage_error(code: int, tmp_dir: Path, out_dir: Path) -> StorageError:
    """One line for a full disk or a directory without write permission: where, how far it got, that nothing is
    left half-written (the temporary directory goes first, so the free space given is what the user has), and
    the fix."""
    written = sum(p.stat().st_size for p in tmp_dir.rglob("*") if p.is_file()) if tmp_dir.exists() else 0
    shutil.rmtree(tmp_dir, ignore_errors=True)
    kept = f"; the shards already in {out_dir} are kept" if (out_dir / MANIFEST).exists() else ""
    fix = ("free space (or raise the quota) or choose another output directory" if code in SPACE_ERRNOS
           else f"make {out_dir.parent} writable or choose another output directory")
    error = StorageError(f"could not write token shards to {out_dir}: {os.strerror(code)} (after "
                         f"{format_bytes(written)} of shards, now removed: {free_space(out_dir)} free on that "
                         f"filesystem{kept}); {fix}, then run the same command again")
    error.errno = code
    return error


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
    with _writing():
        (root / split).mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    buffer = np.empty(shard_tokens, dtype=dtype)
    filled = 0
    num_docs = 0
    eot = tokenizer.eot_id

    def flush() -> None:
        nonlocal filled
        name = f"{split}/shard_{len(shards):06d}.bin"
        with _writing(), open(root / name, "wb") as f:  # not ndarray.tofile: its short write has no errno
            f.write(memoryview(buffer[:filled]))
        shards.append({"file": name, **shard_record(buffer[:filled])})
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


def shard_record(tokens: np.ndarray, block_bytes: int = BLOCK_BYTES) -> dict:
    """What the manifest records of a shard's tokens (as written to disk): counts, the largest id and one CRC-32
    per block, as one hex string (8 digits a block) so that the manifest stays one line per shard.

    >>> shard_record(np.array([1, 2, 3], dtype=np.uint16))
    {'num_tokens': 3, 'num_bytes': 6, 'max_token_id': 3, 'crc32': 'fbbae94e'}
    """
    raw = np.ascontiguousarray(tokens).view(np.uint8)
    crcs = (zlib.crc32(raw[i:i + block_bytes]) for i in range(0, len(raw), block_bytes))
    return {"num_tokens": int(tokens.size), "num_bytes": int(raw.size),
            "max_token_id": int(tokens.max()) if tokens.size else -1, "crc32": "".join(f"{c:08x}" for c in crcs)}


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an old `target` is moved aside first and removed only after."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def load_manifest(data_dir: str | Path) -> dict:
    """Read and check manifest.json of a shard directory: valid JSON, a readable format, every key the readers use."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no token shards at {data_dir} (missing {MANIFEST}); make them with "
                                f"`python launch/prepare_data.py --config <your config>`")
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise UserError(f"{path} is not valid JSON ({detail}); {REBUILD}") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} holds a JSON {type(manifest).__name__}, not an object; {REBUILD}")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise UserError(f"{path} has format_version {version!r}, this dist_lm reads "
                        f"{', '.join(map(str, READABLE_VERSIONS))}; {REBUILD}")
    _require(manifest, (*MANIFEST_KEYS, *(("checksum",) if version >= 2 else ())), path, "")
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise UserError(f"{path} has dtype {manifest['dtype']!r}; accepted: uint16, uint32; {REBUILD}")
    for split, entry in manifest["splits"].items():
        _require(entry, ("shards",), path, f"splits.{split}.")
        for i, shard in enumerate(entry["shards"]):
            _require(shard, SHARD_KEYS[version], path, f"splits.{split}.shards[{i}].")
    if version == 1:
        warn_once(f"{path} is a format-1 manifest (no checksums, no largest token ids): its shards are read "
                  "unchecked; re-prepare them with launch/prepare_data.py --overwrite (the same tokens, checked)")
    return manifest


def _require(entry: object, keys: tuple[str, ...], path: Path, where: str) -> None:
    if not isinstance(entry, dict):
        raise UserError(f"{path}: {where.rstrip('.') or 'the manifest'} is not a JSON object; {REBUILD}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise UserError(f"{path} has no {where}{missing[0]} (a key every manifest of this format has); {REBUILD}")


def check_tokenizer(manifest: dict, fingerprint: str, data_dir: str | Path) -> None:
    """Refuse shards made with a tokenizer other than the one the run uses."""
    if manifest["tokenizer_fingerprint"] != fingerprint:
        raise UserError(
            f"the shards in {data_dir} were made with tokenizer {manifest.get('tokenizer_dir', '(not recorded)')} "
            f"(fingerprint {str(manifest['tokenizer_fingerprint'])[:12]}), not the configured one "
            f"(fingerprint {fingerprint[:12]}); set data.tokenizer_dir to the tokenizer the shards were made with, "
            "or rebuild them with launch/prepare_data.py --overwrite"
        )


@dataclass
class BlockChecks:
    """The CRC-32 of each block of one shard and which blocks this process has checked already."""

    crcs: np.ndarray  # (num_blocks,) uint32
    block_bytes: int
    checked: np.ndarray  # (num_blocks,) bool

    @classmethod
    def from_hex(cls, hex_crcs: str, block_bytes: int) -> BlockChecks:
        crcs = np.array([int(hex_crcs[i:i + 8], 16) for i in range(0, len(hex_crcs), 8)], dtype=np.uint32)
        return cls(crcs, block_bytes, np.zeros(len(crcs), dtype=bool))


VERIFY_MODES = ("lazy", "full", "none")


@dataclass
class ShardedTokens:
    """All shards of one split viewed as one flat array of token ids (memory-mapped, read-only).

    Built by `open`, which fills `files`, `checks` and `vocab_size`; built directly (tests, in-memory arrays)
    without them, nothing is checked.
    """

    arrays: list[np.ndarray]
    offsets: np.ndarray  # (num_shards + 1,) start of each shard in the flat view
    files: list[Path] | None = None
    """Each shard's file, for error messages."""
    checks: list[BlockChecks | None] | None = None
    """Each shard's block checksums (None: a format-1 manifest recorded none)."""
    vocab_size: int | None = None
    """Every id must be below this: read_rows refuses a batch that is not."""

    @classmethod
    def open(cls, data_dir: str | Path, split: str, manifest: dict | None = None, *, vocab_size: int | None = None,
             verify: str = "lazy") -> ShardedTokens:
        """Memory-map the shards of `split`, after checking each one's size and largest token id.

        vocab_size: ids must be below it and below the manifest's vocab_size (the tokenizer's). verify: "lazy"
        checks each checksum block when first read, "full" checks every block now, "none" skips the checksums
        (sizes and ids are still checked).
        """
        if verify not in VERIFY_MODES:
            raise UserError(f"verify={verify!r} is not accepted; use one of {VERIFY_MODES}")
        manifest = manifest if manifest is not None else load_manifest(data_dir)
        if split not in manifest["splits"]:
            raise UserError(f"{data_dir} has no split {split!r}; it has {sorted(manifest['splits'])}")
        dtype = np.dtype(manifest["dtype"])
        limit = min(v for v in (manifest["vocab_size"], vocab_size) if v is not None)
        block_bytes = manifest.get("checksum", {}).get("block_bytes", BLOCK_BYTES)
        arrays, files, checks = [], [], []
        for shard in manifest["splits"][split]["shards"]:
            path = Path(data_dir) / shard["file"]
            _check_shard_file(path, shard, dtype, limit)
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
            files.append(path)
            checks.append(None if verify == "none" or "crc32" not in shard
                          else _block_checks(path, shard, block_bytes))
        offsets = np.cumsum([0] + [len(a) for a in arrays])
        tokens = cls(arrays, offsets, files, checks, limit)
        if verify == "full":
            tokens.verify_all()
        return tokens

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read_rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows [start, start + length) for each start, as one (len(starts), length) int64 array.

        One fancy-indexed gather per shard for the rows inside it (a batch is read with a few numpy calls
        instead of one Python call per row: host time the training step waits for); rows crossing a shard
        boundary go through read(). The blocks read are checksummed the first time, and the ids checked."""
        starts = np.asarray(starts, dtype=np.int64)
        assert starts.size == 0 or (starts.min() >= 0 and starts.max() + length <= len(self)), (starts, length)
        out = np.empty((len(starts), length), dtype=np.int64)
        shard = np.searchsorted(self.offsets, starts, side="right") - 1
        local = starts - self.offsets[shard]
        inside = local + length <= self.offsets[shard + 1] - self.offsets[shard]
        cols = np.arange(length, dtype=np.int64)
        for s in np.unique(shard[inside]):
            rows = np.nonzero(inside & (shard == s))[0]
            self._check_blocks(int(s), local[rows], local[rows] + length)
            out[rows] = self.arrays[int(s)][local[rows, None] + cols]
        for r in np.nonzero(~inside)[0]:
            out[r] = self.read(int(starts[r]), length)
        self._check_ids(out, starts)
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
            self._check_blocks(shard, np.array([lo]), np.array([lo + take]))
            out[filled:filled + take] = self.arrays[shard][lo:lo + take]
            filled += take
            shard += 1
        self._check_ids(out[None], np.array([start]))
        return out

    def verify_all(self) -> None:
        """Check every block not checked yet; raises a UserError naming the first damaged one."""
        for shard, check in enumerate(self.checks or []):
            if check is not None:
                for block in np.nonzero(~check.checked)[0]:
                    self._verify_block(shard, int(block))

    def damaged_blocks(self) -> list[str]:
        """'file, bytes A-B' of every block whose checksum does not match (a full read of every shard)."""
        found = []
        for shard, check in enumerate(self.checks or []):
            for block in range(0 if check is None else len(check.crcs)):
                if self._block_crc(shard, block) != check.crcs[block]:
                    lo, hi = self._block_span(shard, block)
                    found.append(f"{self.files[shard]}, bytes {lo:,}-{hi - 1:,}")
        return found

    def _check_blocks(self, shard: int, lo: np.ndarray, hi: np.ndarray) -> None:
        """Checksum the not yet checked blocks that hold tokens [lo, hi) of a shard (arrays of local offsets)."""
        check = self.checks[shard] if self.checks else None
        if check is None or lo.size == 0:
            return
        item = self.arrays[shard].itemsize
        first, last = lo * item // check.block_bytes, (hi * item - 1) // check.block_bytes
        if int((last - first).max()) <= 1:  # a window within one block or across two: the common case
            blocks = np.union1d(first, last)
        else:
            blocks = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last)]))
        for block in blocks[~check.checked[blocks]]:
            self._verify_block(shard, int(block))

    def _block_span(self, shard: int, block: int) -> tuple[int, int]:
        """Byte range [lo, hi) of a block in its shard file."""
        block_bytes = self.checks[shard].block_bytes
        return block * block_bytes, min((block + 1) * block_bytes, self.arrays[shard].nbytes)

    def _block_crc(self, shard: int, block: int) -> int:
        lo, hi = self._block_span(shard, block)
        item = self.arrays[shard].itemsize
        return zlib.crc32(self.arrays[shard][lo // item:hi // item])  # the memmap's bytes, no copy

    def _verify_block(self, shard: int, block: int) -> None:
        check = self.checks[shard]
        actual = self._block_crc(shard, block)
        if actual != check.crcs[block]:
            lo, hi = self._block_span(shard, block)
            raise UserError(f"shard {self.files[shard]}, bytes {lo:,}-{hi - 1:,}: checksum mismatch (crc32 "
                            f"{actual:08x}, the manifest says {int(check.crcs[block]):08x}): the file changed after "
                            f"it was prepared; restore it from a copy or {REBUILD}")
        check.checked[block] = True

    def _check_ids(self, rows: np.ndarray, starts: np.ndarray) -> None:
        """Refuse rows holding an id >= vocab_size, naming the shard file and offset (not an IndexError later)."""
        if self.vocab_size is None or rows.size == 0 or int(rows.max()) < self.vocab_size:
            return
        row, col = (int(i) for i in np.argwhere(rows >= self.vocab_size)[0])
        flat = int(starts[row]) + col
        shard = int(np.searchsorted(self.offsets, flat, side="right")) - 1
        local = flat - int(self.offsets[shard])
        where = self.files[shard] if self.files else f"shard {shard}"
        raise UserError(f"shard {where} holds token id {int(rows[row, col])} at token {local:,} (byte "
                        f"{local * self.arrays[shard].itemsize:,}), beyond the vocabulary's {self.vocab_size} ids; "
                        f"the file is damaged or was made with another tokenizer: {REBUILD}")


def _check_shard_file(path: Path, shard: dict, dtype: np.dtype, vocab_size: int) -> None:
    """What open checks of one shard without reading it: present, the manifest's size, ids within the vocab."""
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} listed in the manifest is missing; {REBUILD}")
    size = path.stat().st_size
    if size != shard["num_tokens"] * dtype.itemsize or size != shard.get("num_bytes", size):
        raise UserError(f"shard {path} has {size} bytes, the manifest says {shard['num_tokens']} {dtype.name} "
                        f"tokens ({shard['num_tokens'] * dtype.itemsize} bytes); {REBUILD}")
    if shard.get("max_token_id", -1) >= vocab_size:
        raise UserError(f"shard {path} holds token ids up to {shard['max_token_id']} (its manifest entry), beyond "
                        f"the vocabulary's {vocab_size} ids (0..{vocab_size - 1}); it was made with another "
                        f"tokenizer or for a bigger model: {REBUILD} using data.tokenizer_dir's tokenizer")


def _block_checks(path: Path, shard: dict, block_bytes: int) -> BlockChecks:
    check = BlockChecks.from_hex(shard["crc32"], block_bytes)
    if len(check.crcs) != -(-shard["num_bytes"] // block_bytes) or len(shard["crc32"]) % 8:
        raise UserError(f"the manifest entry of shard {path} has {len(shard['crc32']) // 8} checksums for "
                        f"{shard['num_bytes']} bytes in blocks of {block_bytes}; {REBUILD}")
    return check


def verify_shards(data_dir: str | Path, vocab_size: int | None = None) -> dict[str, int]:
    """Read every shard of a data directory in full against its manifest: {"shards": n, "bytes": total}.

    Raises UserError naming every damaged block (up to three in the line, with the count)."""
    manifest = load_manifest(data_dir)
    if manifest["format_version"] < 2:
        raise UserError(f"{Path(data_dir) / MANIFEST} is a format-1 manifest and records no checksums to verify "
                        f"against; re-prepare with launch/prepare_data.py --overwrite")
    damaged, shards, total = [], 0, 0
    for split in manifest["splits"]:
        tokens = ShardedTokens.open(data_dir, split, manifest, vocab_size=vocab_size)  # sizes and ids
        damaged += tokens.damaged_blocks()
        shards += len(tokens.arrays)
        total += sum(a.nbytes for a in tokens.arrays)
    if damaged:
        more = f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        raise UserError(f"{len(damaged)} damaged block(s) in {data_dir}: {'; '.join(damaged[:3])}{more} (checksum "
                        f"mismatch); restore the files from a copy or {REBUILD}")
    return {"shards": shards, "bytes": total}
