"""Encoding: GPT-2's files against tiktoken, round trips, specials, streaming and batch encode."""

import json
import random
from pathlib import Path

import pytest
import tiktoken

from dist_lm.tokenizer import Tokenizer, bpe, load_tokenizer
from dist_lm.tokenizer.formats import CHAR_TO_BYTE

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
SAMPLE = ROOT / "dist_lm" / "data" / "samples" / "tinystories_sample.txt"
SHIPPED = ROOT / "tokenizers" / "tinystories-10k"
EOT = "<|endoftext|>"

VARIED = [
    "Hello, world! How's it going? I'm fine; they're here, we've won, you'll see, he'd go.",
    "Über die Brücke gehen Straßenbahnen; Größe, Mädchen, Fußgänger.",
    "東京は日本の首都です。中文分词测试，한국어 텍스트도 있습니다.",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷🇩🇪 and ✨ sparkles",
    "spaces:   three,      six\t\ttabs\n\n\nnewlines\r\n crlf  \n  trailing   ",
    "digits 1234567890 3.14159 1,000,000 2024-01-01 0x1F 1e-9 ½ ² ٣",
    "contractions: DON'T don't I'LL it's 'quoted' ''double'' '",
    f"before{EOT}after {EOT} spaced{EOT}{EOT}\n{EOT}",
    "",
    " ",
    "\u00a0non-breaking\u00a0space \u3000ideographic\u3000space",
]


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.from_files(FIXTURES / "gpt2" / "gpt2_vocab.json", FIXTURES / "gpt2" / "gpt2_merges.txt", [EOT])


@pytest.fixture(scope="module")
def tiktoken_gpt2() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding built offline from the same two files (ranks = GPT-2 ids of byte strings)."""
    from tiktoken_ext.openai_public import r50k_pat_str

    raw = json.loads((FIXTURES / "gpt2" / "gpt2_vocab.json").read_text(encoding="utf-8"))
    ranks = {bytes(CHAR_TO_BYTE[c] for c in s): i for s, i in raw.items() if s != EOT}
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: raw[EOT]})


@pytest.mark.parametrize("text", VARIED)
def test_gpt2_equals_tiktoken(gpt2, tiktoken_gpt2, text):
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.decode(ids) == text


def test_gpt2_known_answer(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.eot_id == 50256 and gpt2.vocab_size == 50257


@pytest.mark.parametrize("path", [FIXTURES / "corpus.en", SAMPLE], ids=["corpus.en", "tinystories"])
def test_gpt2_equals_tiktoken_on_files(gpt2, tiktoken_gpt2, path):
    text = path.read_text(encoding="utf-8")
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.decode(ids) == text


def test_decode_invalid_utf8_is_replaced(gpt2):
    ids = gpt2.encode("é")
    byte_ids = [gpt2._byte_ids[b] for b in "é".encode()]
    assert gpt2.decode(byte_ids[:1]) == "\ufffd"  # the lead byte of a 2-byte character alone
    assert gpt2.decode(byte_ids) == gpt2.decode(ids) == "é"
    with pytest.raises(ValueError, match="not in the vocab"):
        gpt2.decode([10**9])


def test_overlapping_specials_longest_first():
    vocab = {i: bytes([i]) for i in range(256)}
    tok = Tokenizer(vocab, [], ["<|a|>", "<|a|><|b|>"])
    a, ab = tok.special_ids["<|a|>"], tok.special_ids["<|a|><|b|>"]
    assert (a, ab) == (256, 257) and tok.vocab_size == 258
    assert tok.encode("x<|a|><|b|><|a|>") == [ord("x"), ab, a]


def _reference_bpe(tok: Tokenizer, word: bytes) -> list[int]:
    """GPT-2's rule, spelled out on bytes: merge every occurrence of the lowest-ranked pair, repeat."""
    rank = {pair: r for r, pair in reversed(list(enumerate(tok.merges)))}  # a repeated merge: the first wins
    none = len(tok.merges)
    parts = [bytes([b]) for b in word]
    while len(parts) > 1:
        best = min((rank.get(p, none), p) for p in zip(parts, parts[1:], strict=False))
        if best[0] == none:
            break
        out, i = [], 0
        while i < len(parts):
            if tuple(parts[i : i + 2]) == best[1]:
                out.append(parts[i] + parts[i + 1])
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    inverse = {b: i for i, b in sorted(tok.vocab.items(), reverse=True)}
    return [inverse[p] for p in parts]


def test_merge_loop_equals_reference_on_odd_merges():
    """Merges out of training order, repeats and overlaps: the incremental loop must still follow GPT-2's rule."""
    vocab = {i: bytes([i]) for i in range(256)}
    merges = [(b"ab", b"c"), (b"a", b"a"), (b"c", b"a"), (b"a", b"b"), (b"aa", b"a"), (b"a", b"b"), (b"b", b"ca"),
              (b"aa", b"aa"), (b"abc", b"abc"), (b"b", b"c")]
    for a, b in merges:
        if a + b not in vocab.values():
            vocab[max(vocab) + 1] = a + b
    tok = Tokenizer(vocab, merges)
    rng = random.Random(0)
    words = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 12))) for _ in range(2000)]
    for w in words + ["aaaa", "aaaaa", "abcabc", "abca", "bcabca"]:
        assert list(tok._bpe(w)) == _reference_bpe(tok, w.encode()), w


def test_eot_id_missing_is_an_error():
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], [])
    with pytest.raises(ValueError, match="endoftext"):
        _ = tok.eot_id


def test_encode_iterable_equals_encode(gpt2, tiktoken_gpt2):
    text = "".join(VARIED) * 3 + SAMPLE.read_text(encoding="utf-8")[:200_000]
    with open(SAMPLE, encoding="utf-8") as f:  # file lines: the usual input
        streamed = list(gpt2.encode_iterable(f))
    assert streamed == gpt2.encode(SAMPLE.read_text(encoding="utf-8"))
    # odd piece boundaries: inside words, whitespace runs, and special tokens
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    assert list(gpt2.encode_iterable(pieces)) == tiktoken_gpt2.encode(text, allowed_special="all")


def test_encode_batch_equals_encode(gpt2, monkeypatch):
    docs = SAMPLE.read_text(encoding="utf-8").split(EOT)[:400] + VARIED
    expected = [gpt2.encode(d) for d in docs]
    assert gpt2.encode_batch(docs, num_workers=2) == expected  # small: stays in-process
    assert gpt2.encode_batch(docs, num_workers=1) == expected
    monkeypatch.setattr(bpe, "POOL_MIN_CHARS", 1000)  # force the pool on this small input
    assert gpt2.encode_batch(docs, num_workers=2) == expected


def test_shipped_tokenizer_roundtrips_and_compresses():
    tok = load_tokenizer(SHIPPED)
    assert tok.special_tokens == [EOT] and tok.eot_id == 256
    for path in (SAMPLE, FIXTURES / "corpus.en"):
        text = path.read_text(encoding="utf-8")
        assert tok.decode(tok.encode(text)) == text
    for text in VARIED:
        assert tok.decode(tok.encode(text)) == text
    # TinyStories compresses well with its own tokenizer: > 4 bytes/token on the training sample
    text = SAMPLE.read_text(encoding="utf-8")
    assert len(text.encode()) / len(tok.encode(text)) > 4.0
