"""Pre-tokenization: GPT-2 pattern known answers, specials longest-first, and cuts that change nothing."""

import random
from collections import Counter
from pathlib import Path

import pytest
import regex

from dist_lm.tokenizer.pretokenize import (
    GPT2_PATTERN,
    PRETOKEN_RE,
    count_chunk,
    find_chunk_boundaries,
    find_safe_cut,
    iter_safe_segments,
    pretokens,
    special_regex,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SPECIALS = ["<|endoftext|>", "<|pad|>"]


def test_gpt2_pattern_known_answer():
    text = "Hello, world!  It's 2024\n\n  ok"
    assert PRETOKEN_RE.findall(text) == ["Hello", ",", " world", "!", " ", " It", "'s", " 2024", "\n\n ", " ok"]


@pytest.mark.parametrize("seed", range(5))
def test_fast_pattern_equals_gpt2_pattern(seed):
    """PRETOKEN_RE reorders GPT-2's alternatives for speed; its matches must be GPT-2's, byte for byte."""
    reference = regex.compile(GPT2_PATTERN)
    rng = random.Random(seed)
    contractions = "'s'S 're'll''d 'x ' ''ve\u00a0'm 12'd a'tb\t'll\n'"
    texts = [_random_text(rng, 2000), contractions, (FIXTURES / "corpus.en").read_text(encoding="utf-8")]
    for text in texts:
        assert PRETOKEN_RE.findall(text) == reference.findall(text)


def test_specials_are_boundaries_and_removed():
    sre = special_regex(SPECIALS)
    assert pretokens("a<|endoftext|>b <|pad|> c", sre) == ["a", "b", " ", " c"]


def test_overlapping_specials_longest_first():
    sre = special_regex(["<|a|>", "<|a|><|b|>"])
    assert sre.split("x<|a|><|b|>y<|a|>z") == ["x", "<|a|><|b|>", "y", "<|a|>", "z"]


def test_find_safe_cut_known_answers():
    assert find_safe_cut("Once upon a time", 16) == 11  # before " time"
    assert find_safe_cut("Once upon a time", 10) == 9  # before " a"
    assert find_safe_cut("   x", 4) == 0  # no non-space followed by a space
    # a special containing a space must not be cut inside
    assert find_safe_cut("ab<|x y|>cd e", 6, ["<|x y|>"]) == 0


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = ["a", "b", "Z", "é", "中", "1", "2", " ", " ", "  ", "\n", "\n\n", "\t", "'s", "'", ".", "!",
                "\u00a0", "\u3000", "😀", "<|endoftext|>", "<|pad|>", "<|end"]
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("seed", range(20))
def test_safe_segments_preserve_pretokens(seed):
    rng = random.Random(seed)
    text = _random_text(rng, 400)
    # split the stream at random places, then regroup with a tiny min_chars to force many cuts
    cuts = sorted(rng.sample(range(1, len(text)), 30))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=False)]
    segments = list(iter_safe_segments(pieces, SPECIALS, min_chars=8))
    assert "".join(segments) == text
    assert len(segments) > 5
    sre = special_regex(SPECIALS)
    assert [t for s in segments for t in pretokens(s, sre)] == pretokens(text, sre)


def test_chunked_counts_equal_whole_file(tmp_path):
    text = (FIXTURES / "corpus.en").read_text(encoding="utf-8")
    path = tmp_path / "c.txt"
    # documents separated by a special, plus a special-free tail to exercise the whitespace fallback
    path.write_text("<|endoftext|>".join([text[:40000], text[40000:80000]]) + text[80000:], encoding="utf-8")
    size = path.stat().st_size
    bounds = find_chunk_boundaries(path, 7, ["<|endoftext|>"])
    assert bounds[0] == 0 and bounds[-1] == size and len(bounds) == 8
    assert bounds == sorted(set(bounds))
    total: Counter = Counter()
    for a, b in zip(bounds[:-1], bounds[1:], strict=False):
        total.update(count_chunk(str(path), a, b, ["<|endoftext|>"]))
    whole = Counter(pretokens(path.read_text(encoding="utf-8"), special_regex(["<|endoftext|>"])))
    assert total == whole
