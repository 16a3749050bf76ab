"""Tokenizer: byte-level BPE encode / decode, batch and streaming encode, save / load.

Design decisions:
- Encoding = split on special tokens (longest first at a position) -> GPT-2 regex pre-tokens ->
  per pre-token BPE. Pre-token -> ids goes through a cache (a dict whose `__missing__` runs the
  merges), so `map(cache.__getitem__, pretokens)` stays in C for every repeated word; the regex is
  then most of the time. The cache is cleared when it passes `CACHE_MAX` entries so memory stays
  bounded on endless, diverse input.
- The merge loop applies, repeatedly, the lowest-ranked merge among adjacent pairs, all its
  non-overlapping occurrences left to right: GPT-2's rule, which tiktoken and `tokenizers` match.
- Vocab and merges are checked against each other at construction: every merge's parts and result
  must be tokens, and all 256 bytes must be present, otherwise some text could not be encoded.
- Special tokens already in the vocab (GPT-2's "<|endoftext|>", ours at 256...) keep their id;
  others get the next free ids. Overlapping specials are allowed here (longest wins); training,
  which must cut files at specials, refuses a special that is a prefix of another.
- `encode_iterable` regroups its input at safe cuts (pretokenize.iter_safe_segments), so its ids
  equal `encode("".join(input))` while memory stays flat.
- `encode_batch` uses a fork pool: the tokenizer is inherited by each worker, not pickled per task.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path

from dist_lm.tokenizer import formats
from dist_lm.tokenizer.pretokenize import PRETOKEN_RE, iter_safe_segments, special_regex

EOT = "<|endoftext|>"
CACHE_MAX = 200_000  # pre-tokens; ~40 MB of strings and tuples at most
_NO_RANK = 1 << 62  # rank of a pair that has no merge


class _MergeCache(dict):
    """pre-token -> tuple of ids; a miss runs BPE on the pre-token's bytes."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__()
        self._tok = tokenizer

    def __missing__(self, word: str) -> tuple[int, ...]:
        if len(self) >= CACHE_MAX:
            self.clear()
        ids = self._tok._bpe(word)
        self[word] = ids
        return ids


class Tokenizer:
    """Byte-level BPE tokenizer over `vocab` (id -> bytes) and `merges` (in merge order)."""

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Sequence[str] | None = None,
    ):
        self.vocab: dict[int, bytes] = dict(vocab)
        self.merges: list[tuple[bytes, bytes]] = list(merges)
        self.special_tokens: list[str] = list(dict.fromkeys(special_tokens or []))
        inverse: dict[bytes, int] = {}
        for i, b in self.vocab.items():
            inverse.setdefault(b, i)  # a duplicate token keeps its lowest id

        # Specials: the id already in the vocab, else the next free id.
        self.special_ids: dict[str, int] = {}
        for s in self.special_tokens:
            b = s.encode("utf-8")
            if b not in inverse:
                i = max(self.vocab, default=-1) + 1
                self.vocab[i] = b
                inverse[b] = i
            self.special_ids[s] = inverse[b]

        missing = [b for b in range(256) if bytes([b]) not in inverse]
        if missing:
            raise ValueError(
                f"vocab lacks {len(missing)} single-byte token(s) (first: byte {missing[0]}); a byte-level "
                f"BPE vocab needs all 256 bytes: are vocab and merges from the same tokenizer?"
            )
        self._byte_ids = [inverse[bytes([b])] for b in range(256)]

        # (left id, right id) -> merge rank, and -> merged id
        self._ranks: dict[tuple[int, int], int] = {}
        self._merged: dict[tuple[int, int], int] = {}
        for rank, (a, b) in enumerate(self.merges):
            for part in (a, b, a + b):
                if part not in inverse:
                    raise ValueError(
                        f"vocab and merges disagree: merge {rank + 1} ({a!r}, {b!r}) needs token {part!r}, "
                        f"which is not in the vocab; load a vocab and merges saved together"
                    )
            pair = (inverse[a], inverse[b])
            if pair not in self._ranks:  # a repeated merge line never applies: the first one wins
                self._ranks[pair] = rank
                self._merged[pair] = inverse[a + b]

        self._special_re = special_regex(self.special_tokens)
        self._cache = _MergeCache(self)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_files(
        cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike, special_tokens: Sequence[str] | None = None
    ) -> Tokenizer:
        """Load GPT-2-format `vocab.json` + `merges.txt` (GPT-2's own files included)."""
        specials = list(special_tokens or [])
        return cls(formats.read_gpt2_vocab(vocab_path, specials), formats.read_gpt2_merges(merges_path), specials)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer directory written by `save` (or by launch/train_tokenizer.py)."""
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory {str(d)!r} not found; train one with "
                f"`python launch/train_tokenizer.py --input CORPUS --vocab-size N --out {d}`"
            )
        specials = formats.read_config(d)
        tok = cls.from_files(d / "vocab.json", d / "merges.txt", specials)
        hf_path = d / "tokenizer.json"
        if hf_path.is_file():
            # The HF export must describe the same tokenizer; a stale one would give other ids elsewhere.
            hf = json.loads(hf_path.read_text(encoding="utf-8"))
            expected = formats.hf_tokenizer_json(tok.vocab, tok.merges, tok.special_ids)["model"]
            model = hf.get("model", {})
            if model.get("vocab") != expected["vocab"] or model.get("merges") != expected["merges"]:
                raise ValueError(
                    f"{str(hf_path)!r} disagrees with vocab.json/merges.txt in {str(d)!r}; "
                    f"re-save the tokenizer (Tokenizer.load(...).save(dir) is not possible on a broken dir: "
                    f"delete tokenizer.json, load, and save again)"
                )
        return tok

    def save(self, directory: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt, tokenizer.json and tokenizer_config.json into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        formats.write_gpt2_files(d, self.vocab, self.merges, self.special_tokens)
        hf = formats.hf_tokenizer_json(self.vocab, self.merges, self.special_ids)
        (d / "tokenizer.json").write_text(json.dumps(hf, ensure_ascii=False) + "\n", encoding="utf-8")
        formats.write_config(d, self.special_tokens)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Max id + 1, specials included: the embedding size a model needs."""
        return max(self.vocab) + 1

    @property
    def eot_id(self) -> int:
        if EOT not in self.special_ids:
            raise ValueError(
                f"this tokenizer has no {EOT!r} special token (specials: {self.special_tokens}); "
                f"train or load it with special_tokens=[{EOT!r}]"
            )
        return self.special_ids[EOT]

    def fingerprint(self) -> str:
        """sha256 over merges, vocab (sorted by id) and specials, as canonical JSON of hex strings."""
        canon = {
            "merges": [[a.hex(), b.hex()] for a, b in self.merges],
            "vocab": [[i, self.vocab[i].hex()] for i in sorted(self.vocab)],
            "special_tokens": self.special_tokens,
        }
        return hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, specials={self.special_tokens})"

    # ---- encode -------------------------------------------------------------------------------
    def _bpe(self, word: str) -> tuple[int, ...]:
        # A plain loop measured 2x faster here than min()/map()/list.index variants: words are short.
        ids = [self._byte_ids[b] for b in word.encode("utf-8")]
        get = self._ranks.get
        while len(ids) > 1:
            best = _NO_RANK
            for pair in zip(ids, ids[1:], strict=False):
                r = get(pair, _NO_RANK)
                if r < best:
                    best = r
                    best_pair = pair
            if best == _NO_RANK:
                break
            a, b = best_pair
            new = self._merged[best_pair]
            out: list[int] = []  # every non-overlapping occurrence, left to right
            i, n = 0, len(ids)
            while i < n:
                if ids[i] == a and i + 1 < n and ids[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return tuple(ids)

    def _encode_plain(self, text: str, out: list[int]) -> None:
        out.extend(chain.from_iterable(map(self._cache.__getitem__, PRETOKEN_RE.findall(text))))

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens in the text become their ids."""
        out: list[int] = []
        if self._special_re is None:
            self._encode_plain(text, out)
            return out
        for k, part in enumerate(self._special_re.split(text)):
            if k % 2:
                out.append(self.special_ids[part])
            elif part:
                self._encode_plain(part, out)
        return out

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily yield the ids of the concatenated strings (e.g. a file's lines); flat memory."""
        for segment in iter_safe_segments(iterable, self.special_tokens, min_chars=1 << 16):
            yield from self.encode(segment)

    def encode_batch(self, texts: Sequence[str], num_workers: int | None = None) -> list[list[int]]:
        """`[encode(t) for t in texts]`, over `num_workers` processes (None = all cores)."""
        if num_workers is None:
            num_workers = os.cpu_count() or 1
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers} must be >= 1 (or None for all cores)")
        total = sum(len(t) for t in texts)
        if num_workers == 1 or len(texts) < 2 or total < (1 << 16):
            return [self.encode(t) for t in texts]  # a pool costs more than it saves on small inputs
        ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
        # Large chunks: per-task overhead (pickling the results) is then a small share.
        chunksize = max(1, len(texts) // (num_workers * 4))
        # With fork, initargs are inherited by the children, not pickled.
        with ctx.Pool(num_workers, initializer=_set_worker_tokenizer, initargs=(self,)) as pool:
            return pool.map(_encode_in_worker, texts, chunksize=chunksize)

    # ---- decode -------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join([self.vocab[i] for i in ids])
        except KeyError as e:
            raise ValueError(f"id {e.args[0]!r} is not in the vocab (size {self.vocab_size})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


_WORKER_TOKENIZER: Tokenizer | None = None


def _set_worker_tokenizer(tok: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok


def _encode_in_worker(text: str) -> list[int]:
    assert _WORKER_TOKENIZER is not None
    return _WORKER_TOKENIZER.encode(text)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer directory (vocab.json, merges.txt, tokenizer_config.json[, tokenizer.json])."""
    return Tokenizer.load(directory)
