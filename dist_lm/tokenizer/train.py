"""Byte-level BPE training: parallel pre-token counts, then incremental pair-count merges.

Id layout of a trained vocab: ids 0..255 are the single bytes (id == byte value), then the special
tokens in the order given (256, 257, ...), then one id per merge in merge order. So
`vocab_size = 256 + len(special_tokens) + len(merges)`.

Design decisions:
- Counting: the file is cut into chunks at special tokens (or, where there are none, at a
  whitespace cut that cannot change pre-tokens; see pretokenize.py). Each worker streams its chunk
  in 1 MiB reads and returns a Counter of pre-token strings, so memory is bounded by the number of
  distinct pre-tokens. Counts are summed, so the result does not depend on the number of workers.
- Merging works on distinct words (pre-tokens) weighted by their counts. `pair_counts` and
  `pair_words` (pair -> indices of the words containing it) are updated only for the words that
  contain the merged pair. The best pair comes from a max-heap with lazy deletion: every count
  change pushes a fresh entry, and a popped entry whose count is stale is dropped.
- Ties go to the lexicographically greater pair of byte strings, as GPT-2-style trainers do. heapq
  is a min-heap, so each token carries a key that sorts in reverse byte order (see `_reverse_key`);
  tuple comparison then stays in C.
- Training stops early when no pair is left (every word is one token): small corpora cannot fill
  a large vocab; the summary says so.
"""

from __future__ import annotations

import heapq
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from dist_lm.errors import UserError
from dist_lm.tokenizer.pretokenize import count_chunk, find_chunk_boundaries

logger = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # chunks of ~8 MiB: enough to amortize a task, small enough for a live progress bar


@dataclass
class TrainStats:
    """What a training run measured; the CLI and the benchmark print it."""

    pretokenize_s: float
    """Wall time to read the corpus and count pre-tokens (all workers)."""
    merge_s: float
    """Wall time of the merge loop."""
    corpus_bytes: int
    """Size of the input file in bytes."""
    num_pretokens: int
    """Pre-tokens in the corpus (with repetition)."""
    num_distinct_pretokens: int
    """Distinct pre-tokens: what the merge loop works on."""
    num_merges: int
    """Merges learned."""
    vocab_size: int
    """Final vocab size (bytes + specials + merges); below the request when pairs ran out."""
    corpus_tokens: int
    """Tokens the corpus encodes to with the learned merges (specials not counted)."""
    num_workers: int
    """Processes used for counting."""

    @property
    def bytes_per_token(self) -> float:
        return self.corpus_bytes / max(1, self.corpus_tokens)

    def summary(self) -> str:
        return (
            f"trained in {self.pretokenize_s + self.merge_s:.2f}s (pre-tokenize {self.pretokenize_s:.2f}s "
            f"with {self.num_workers} worker(s), merges {self.merge_s:.2f}s); vocab {self.vocab_size} "
            f"({self.num_merges} merges, {self.num_distinct_pretokens} distinct pre-tokens); "
            f"{self.bytes_per_token:.3f} bytes/token on the training corpus"
        )


def validate_special_tokens(special_tokens: Sequence[str]) -> list[str]:
    """Reject specials that would make chunking or the vocab ambiguous; return them as a list."""
    specials = list(special_tokens)
    for s in specials:
        if not isinstance(s, str) or not s:
            raise UserError(f"special token {s!r} must be a non-empty string")
    if len(set(specials)) != len(specials):
        dup = sorted({s for s in specials if specials.count(s) > 1})
        raise UserError(f"special tokens {dup} are listed twice; list each once")
    for a in specials:
        for b in specials:
            if a != b and b.startswith(a):
                # For encoding, overlaps resolve longest-first; for training we refuse, since a prefix
                # special makes "where does this document end" depend on lookahead across chunk cuts.
                raise UserError(
                    f"special token {a!r} is a prefix of {b!r}; training needs prefix-free specials "
                    f"(rename one, e.g. {a[:-1] + '_' + a[-1:]!r})"
                )
    return specials


def _reverse_key(b: bytes) -> tuple[int, ...]:
    """Key with key(x) < key(y) iff x > y as bytes, so a min-heap pops the greatest pair first.

    Negated byte values reverse the order where two strings differ; the trailing 1 (> any negated
    byte) makes a proper prefix sort after its extensions, since b"ab" > b"a".

    >>> _reverse_key(b"ab") < _reverse_key(b"a") < _reverse_key(b"B")
    True
    """
    return (*(-x for x in b), 1)


def count_pretokens(
    input_path: str | os.PathLike, special_tokens: Sequence[str], num_workers: int, progress: bool
) -> Counter[str]:
    """Sum of per-chunk pre-token counts over a process pool (or in-process for one worker)."""
    path = os.fspath(input_path)
    size = os.path.getsize(path)
    num_chunks = max(num_workers, -(-size // CHUNK_BYTES))
    bounds = find_chunk_boundaries(path, num_chunks, special_tokens)
    tasks = [(path, a, b, tuple(special_tokens)) for a, b in zip(bounds[:-1], bounds[1:], strict=False) if b > a]
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="pre-tokenize", disable=not progress, file=sys.stderr)
    total: Counter[str] = Counter()
    if num_workers == 1 or len(tasks) == 1:
        for t in tasks:
            total.update(count_chunk(*t))
            bar.update(t[2] - t[1])
    else:
        # fork: workers start in milliseconds and need nothing from the parent but the task tuple.
        ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
        with ctx.Pool(min(num_workers, len(tasks))) as pool:
            for t, counts in zip(tasks, pool.imap(_count_task, tasks), strict=False):
                total.update(counts)
                bar.update(t[2] - t[1])
    bar.close()
    return total


def _count_task(task: tuple[str, int, int, tuple[str, ...]]) -> Counter[str]:
    return count_chunk(*task)


def merge_words(
    word_counts: Counter[str], num_merges: int, first_id: int, progress: bool = False
) -> tuple[list[tuple[int, int]], list[list[int]], list[int]]:
    """Learn up to `num_merges` merges over weighted words; new ids start at `first_id`.

    Returns (merges as id pairs, final words as id lists, word weights). Ids below 256 are bytes.
    """
    token_bytes: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
    rkey: dict[int, tuple[int, ...]] = {i: _reverse_key(token_bytes[i]) for i in range(256)}
    words: list[list[int]] = []
    freqs: list[int] = []
    for w, c in word_counts.items():
        ids = list(w.encode("utf-8"))
        if len(ids) > 1:  # one-byte words have no pairs: they never change
            words.append(ids)
            freqs.append(c)

    pair_counts: dict[tuple[int, int], int] = {}
    pair_words: dict[tuple[int, int], set[int]] = {}
    for wi, (ids, f) in enumerate(zip(words, freqs, strict=False)):
        for p in zip(ids, ids[1:], strict=False):
            pair_counts[p] = pair_counts.get(p, 0) + f
            s = pair_words.get(p)
            if s is None:
                pair_words[p] = {wi}
            else:
                s.add(wi)
    heap = [(-c, rkey[a], rkey[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    bar = tqdm(total=num_merges, desc="merges", disable=not progress, file=sys.stderr)
    new_id = first_id
    while len(merges) < num_merges and heap:
        negc, _, _, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -negc or negc == 0:
            continue  # stale entry: this pair's count changed since it was pushed
        pair = (a, b)
        merges.append(pair)
        token_bytes[new_id] = token_bytes[a] + token_bytes[b]
        rkey[new_id] = _reverse_key(token_bytes[new_id])
        touched: set[tuple[int, int]] = set()
        for wi in pair_words.pop(pair):
            ids = words[wi]
            f = freqs[wi]
            # 1) rewrite the word, merging left to right (non-overlapping, as encoding does)
            out: list[int] = []
            i, n = 0, len(ids)
            while i < n:
                if i + 1 < n and ids[i] == a and ids[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            # 2) move this word's weight from its old pairs to its new ones
            old_pairs = list(zip(ids, ids[1:], strict=False))
            new_pairs = list(zip(out, out[1:], strict=False))
            for p in old_pairs:
                pair_counts[p] -= f
                touched.add(p)
            for p in new_pairs:
                pair_counts[p] = pair_counts.get(p, 0) + f
                touched.add(p)
            for p in set(old_pairs).difference(new_pairs):
                s = pair_words.get(p)
                if s is not None:
                    s.discard(wi)
            for p in new_pairs:
                s = pair_words.get(p)
                if s is None:
                    pair_words[p] = {wi}
                else:
                    s.add(wi)
            words[wi] = out
        pair_counts.pop(pair, None)
        # 3) re-announce every pair whose count may have changed; older entries become stale
        for p in touched:
            c = pair_counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, rkey[p[0]], rkey[p[1]], p[0], p[1]))
            elif p in pair_counts:
                del pair_counts[p]
                pair_words.pop(p, None)
        new_id += 1
        bar.update(1)
    if len(merges) < num_merges:
        # Out of pairs before the requested vocab: the work is done, so the bar ends full at what was done
        # (the summary and the warning say the vocab fell short) instead of stopping at, say, 40%.
        bar.total = len(merges)
        bar.refresh()
    bar.close()
    return merges, words, freqs


def train_bpe_with_stats(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    *,
    num_workers: int | None = None,
    progress: bool = True,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]], TrainStats]:
    """`train_bpe` that also returns the timings and sizes it measured."""
    specials = validate_special_tokens(special_tokens)
    path = os.fspath(input_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus {path!r} does not exist; pass the path of a UTF-8 text file")
    min_size = 256 + len(specials)
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise UserError(
            f"vocab_size={vocab_size!r} is below 256 bytes + {len(specials)} special token(s) = {min_size}; "
            f"ask for at least {min_size}"
        )
    if os.path.getsize(path) == 0:
        raise UserError(f"corpus {path!r} is empty; pass a file with text in it")
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    if num_workers < 1:
        raise UserError(f"num_workers={num_workers} must be >= 1 (or None for all cores)")

    t0 = time.perf_counter()
    counts = count_pretokens(path, specials, num_workers, progress)
    t1 = time.perf_counter()
    if not counts:
        raise UserError(f"corpus {path!r} has no text outside special tokens; pass a file with text in it")

    first_id = 256 + len(specials)
    id_merges, words, freqs = merge_words(counts, vocab_size - first_id, first_id, progress)
    t2 = time.perf_counter()

    vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
    for k, s in enumerate(specials):
        vocab[256 + k] = s.encode("utf-8")
    merges: list[tuple[bytes, bytes]] = []
    for k, (a, b) in enumerate(id_merges):
        vocab[first_id + k] = vocab[a] + vocab[b]
        merges.append((vocab[a], vocab[b]))

    # Tokens of the corpus = sum of final word lengths; one-byte words were left out of `words`.
    corpus_tokens = sum(len(w) * f for w, f in zip(words, freqs, strict=False))
    corpus_tokens += sum(c for w, c in counts.items() if len(w.encode("utf-8")) == 1)
    stats = TrainStats(
        pretokenize_s=t1 - t0,
        merge_s=t2 - t1,
        corpus_bytes=os.path.getsize(path),
        num_pretokens=sum(counts.values()),
        num_distinct_pretokens=len(counts),
        num_merges=len(merges),
        vocab_size=len(vocab),
        corpus_tokens=corpus_tokens,
        num_workers=num_workers,
    )
    if len(vocab) < vocab_size:
        logger.warning(
            "stopped at vocab %d < %d requested: every pre-token of %s is a single token, no pair is left "
            "(the corpus is too small for this vocab)",
            len(vocab),
            vocab_size,
            path,
        )
    return vocab, merges, stats


def train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    *,
    num_workers: int | None = None,
    progress: bool = False,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE on a UTF-8 text file.

    Returns `vocab` (id -> bytes; layout in the module docstring) and `merges` in merge order. The
    result depends only on the file, `vocab_size` and `special_tokens`, not on `num_workers`
    (None = all cores). `progress` shows bars and logs a summary.
    """
    vocab, merges, stats = train_bpe_with_stats(
        input_path, vocab_size, special_tokens, num_workers=num_workers, progress=progress
    )
    if progress:
        print(stats.summary(), file=sys.stderr)
    return vocab, merges
