"""Tokenizer: byte-level BPE encode / decode, batch and streaming encode, save / load.

Design decisions:
- Encoding = split on special tokens (longest first at a position) -> GPT-2 regex pre-tokens ->
  per pre-token BPE. Pre-token -> ids goes through a cache (a dict whose `__missing__` runs the
  merges), so `map(cache.__getitem__, pretokens)` stays in C for every repeated word. The cache is
  cleared when it passes `CACHE_MAX` entries so memory stays bounded on endless, diverse input.
- Where cold time goes (GPT-2's files, corpus.en: 133 kB, 27.8k pre-tokens, 4.8k distinct, 28.7k
  merges to apply): regex ~7 ms, cache lookups ~2 ms, BPE of the distinct words ~25 ms. Warm, the
  regex is most of the time. So the merge loop is built for few Python steps per merge:
  `ranks[j]` holds the rank of pair j, computed once in C (`map`), and a merge updates only its two
  neighbours (two lookups in `_rows[left][right]`, nested dicts: no tuple per lookup) before
  `min`/`index` (C) find the next one. That is ~0.6 us per merge in context, 2x the previous loop,
  which rescanned every pair in Python after each merge. Measured and dropped: str.replace over
  one-char-per-token strings (rescanning all pairs in C each round costs as much), int pair keys,
  sentinel ids, and a lazy top-down check that a word which is a vocab token encodes to that token
  (every node of its merge tree must be checked once: ~12% gain for ~50 lines of proof-carrying code).
  Pure Python stays near that floor. What does pay: most first-seen words are whole vocab tokens, so
  construction runs BPE once on every token's text and keeps those that come out as that single token
  (`_single_token_words`, exact by construction, from the vocab alone); a miss on such a word skips the
  merge loop. The next step after that is a compiled merge loop.
- The merge loop applies, repeatedly, the lowest-ranked merge among adjacent pairs, all its
  non-overlapping occurrences left to right: GPT-2's rule, which tiktoken and `tokenizers` match.
- Vocab and merges are checked against each other at construction: every merge's parts and result
  must be tokens, and all 256 bytes must be present, otherwise some text could not be encoded.
- Special tokens already in the vocab (GPT-2's "<|endoftext|>", ours at 256...) keep their id;
  others get the next free ids. Overlapping specials are allowed here (longest wins); training,
  which must cut files at specials, refuses a special that is a prefix of another.
- `encode_iterable` regroups its input at safe cuts (pretokenize.iter_safe_segments), so its ids
  equal `encode("".join(input))` while memory stays flat.
- `encode_batch` uses a fork pool: the tokenizer (and its warm cache) is inherited by each worker, not
  pickled per task; ids come back as arrays (one bytes blob each). Below `POOL_MIN_CHARS` per worker
  it encodes in-process: on 2 cores the pool broke even at ~1 MB and lost below.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, repeat
from pathlib import Path

from dist_lm.errors import UserError
from dist_lm.tokenizer import formats
from dist_lm.tokenizer.pretokenize import PRETOKEN_RE, iter_safe_segments, special_regex

EOT = "<|endoftext|>"
POOL_MIN_CHARS = 1 << 20  # per worker; below it encode_batch stays in-process (measured crossover ~1 MB)
CACHE_MAX = 200_000  # pre-tokens; ~40 MB of strings and tuples at most
_EMPTY_ROW: dict[int, int] = {}  # merges starting with an id that starts none; never mutated


class _MergeCache(dict):
    """pre-token -> tuple of ids; a miss runs BPE on the pre-token's bytes."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__()
        self._tok = tokenizer

    def __missing__(self, word: str) -> tuple[int, ...]:
        if len(self) >= CACHE_MAX:
            self.clear()
        ids = self._tok._whole_words.get(word) or self._tok._bpe(word)
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
            raise UserError(
                f"vocab lacks {len(missing)} single-byte token(s) (first: byte {missing[0]}); a byte-level "
                f"BPE vocab needs all 256 bytes: are vocab and merges from the same tokenizer?"
            )
        self._byte_ids = [inverse[bytes([b])] for b in range(256)]

        # Merge tables, indexed for the merge loop (see `_bpe`): `_rows[left id]` is a dict
        # right id -> merge rank (one shared empty dict for ids that start no merge), and
        # `_merged[rank]` the id the merge makes. A nested dict, not a (left, right) tuple key,
        # saves building a tuple per lookup: ~10% of the loop.
        self._num_ranks = len(self.merges)  # the "no merge" rank: above every real one, and a small int
        self._rows: list[dict[int, int]] = [_EMPTY_ROW] * (max(self.vocab) + 1)
        self._merged: list[int] = [0] * len(self.merges)
        for rank, (a, b) in enumerate(self.merges):
            for part in (a, b, a + b):
                if part not in inverse:
                    raise UserError(
                        f"vocab and merges disagree: merge {rank + 1} ({a!r}, {b!r}) needs token {part!r}, "
                        f"which is not in the vocab; load a vocab and merges saved together"
                    )
            left, right = inverse[a], inverse[b]
            row = self._rows[left]
            if row is _EMPTY_ROW:
                row = self._rows[left] = {}
            if right not in row:  # a repeated merge line never applies: the first one wins
                row[right] = rank
                self._merged[rank] = inverse[a + b]

        self._special_re = special_regex(self.special_tokens)
        self._fingerprint: str | None = None
        self._whole_words = self._single_token_words()
        self._cache = _MergeCache(self)

    def _single_token_words(self) -> dict[str, tuple[int]]:
        """Text of every token that BPE provably encodes as that one token (checked by running BPE on it).

        Most distinct words in real text are whole tokens (~80% of corpus.en's with GPT-2's vocab), so a
        first-seen word skips the merge loop. Derived from the vocab alone, once, at construction
        (~0.1 s for GPT-2's 50k tokens); exact, since a token whose BPE is another split is left out.
        """
        specials = set(self.special_ids.values())
        words: dict[str, tuple[int]] = {}
        for i, b in self.vocab.items():
            if i in specials or len(b) < 2:
                continue
            try:
                text = b.decode("utf-8")
            except UnicodeDecodeError:  # a token inside a multi-byte character is never a whole pre-token
                continue
            if self._bpe(text) == (i,):
                words[text] = (i,)
        return words

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
            hf = formats.read_json(hf_path, "HF tokenizer file", "delete it, then load and save the tokenizer again")
            expected = formats.hf_tokenizer_json(tok.vocab, tok.merges, tok.special_ids)["model"]
            model = hf.get("model", {})
            if model.get("vocab") != expected["vocab"] or model.get("merges") != expected["merges"]:
                raise UserError(
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
            raise UserError(
                f"this tokenizer has no {EOT!r} special token (specials: {self.special_tokens}); "
                f"train or load it with special_tokens=[{EOT!r}]"
            )
        return self.special_ids[EOT]

    def fingerprint(self) -> str:
        """sha256 over merges, vocab (sorted by id) and specials, as canonical JSON of hex strings.

        Computed once: a Tokenizer does not change after construction, and the trainer asks at every checkpoint.
        """
        if self._fingerprint is not None:
            return self._fingerprint
        canon = {
            "merges": [[a.hex(), b.hex()] for a, b in self.merges],
            "vocab": [[i, self.vocab[i].hex()] for i in sorted(self.vocab)],
            "special_tokens": self.special_tokens,
        }
        self._fingerprint = hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode("utf-8")).hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, specials={self.special_tokens})"

    # ---- encode -------------------------------------------------------------------------------
    def _bpe(self, word: str) -> tuple[int, ...]:
        # 1) `ranks[j]` is the merge rank of the pair (ids[j], ids[j + 1]), computed once, in C (map).
        # 2) Merge the leftmost pair of lowest rank; only its two neighbours' ranks change, so each
        #    merge costs two dict lookups plus min/index over a short list (C), not a rescan of all
        #    pairs in Python (the previous loop: 2x slower on GPT-2's merges).
        # 3) GPT-2's rule merges *all* occurrences of that pair, left to right, before the next rank:
        #    the `r in ranks` check continues with the next occurrence at once, so the result is
        #    GPT-2's even for merge lists where a merged token could take part in a lower-ranked merge.
        ids = list(map(self._byte_ids.__getitem__, word.encode("utf-8")))
        if len(ids) < 2:
            return tuple(ids)
        rows, merged, none = self._rows, self._merged, self._num_ranks
        ranks = list(map(dict.get, map(rows.__getitem__, ids), ids[1:], repeat(none)))
        r = min(ranks)
        while r != none:
            new = merged[r]
            i = ranks.index(r)
            while True:
                ids[i] = new
                del ids[i + 1], ranks[i]
                if i:
                    ranks[i - 1] = rows[ids[i - 1]].get(new, none)
                if i < len(ranks):
                    ranks[i] = rows[new].get(ids[i + 1], none)
                if r not in ranks:
                    break
                i = ranks.index(r, i)
            if not ranks:
                break
            r = min(ranks)
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
        """`[encode(t) for t in texts]`, over up to `num_workers` processes (None = all cores).

        Inputs under POOL_MIN_CHARS per worker are encoded in this process: below that, starting a pool
        and sending the ids back cost more than a second core gives (benchmarks/README.md).
        """
        if num_workers is None:
            num_workers = os.cpu_count() or 1
        if num_workers < 1:
            raise UserError(f"num_workers={num_workers} must be >= 1 (or None for all cores)")
        num_workers = min(num_workers, len(texts), sum(map(len, texts)) // POOL_MIN_CHARS)
        if num_workers < 2:
            return [self.encode(t) for t in texts]
        ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
        # Large chunks: per-task overhead is then a small share.
        chunksize = max(1, len(texts) // (num_workers * 4))
        # With fork, initargs are inherited by the children, not pickled.
        with ctx.Pool(num_workers, initializer=_set_worker_tokenizer, initargs=(self,)) as pool:
            return [a.tolist() for a in pool.map(_encode_in_worker, texts, chunksize=chunksize)]

    # ---- decode -------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join([self.vocab[i] for i in ids])
        except KeyError as e:
            raise UserError(f"id {e.args[0]!r} is not in the vocab (size {self.vocab_size})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


_WORKER_TOKENIZER: Tokenizer | None = None


def _set_worker_tokenizer(tok: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok


def _encode_in_worker(text: str) -> array:
    assert _WORKER_TOKENIZER is not None
    # An array pickles as one bytes blob: ~10x cheaper to send back than a list of ints.
    return array("q", _WORKER_TOKENIZER.encode(text))


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer directory (vocab.json, merges.txt, tokenizer_config.json[, tokenizer.json])."""
    return Tokenizer.load(directory)
