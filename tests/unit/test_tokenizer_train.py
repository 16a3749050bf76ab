"""BPE training: known answers, a naive reference trainer, determinism across workers, HF compression, bad input."""

from collections import Counter
from pathlib import Path

import pytest

from dist_lm.tokenizer import Tokenizer, train_bpe
from dist_lm.tokenizer.pretokenize import pretokens, special_regex
from dist_lm.tokenizer.train import _reverse_key

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SAMPLE = Path(__file__).resolve().parents[2] / "dist_lm" / "data" / "samples" / "tinystories_sample.txt"
EOT = "<|endoftext|>"


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(text, encoding="utf-8")
    return p


def test_known_answer_with_ties(tmp_path):
    # pairs: (t,h)=3 ties (h,e)=3 -> the greater pair (t,h) first; later (c,a), (a,t), (' ',c) tie at 1.
    vocab, merges = train_bpe(_write(tmp_path, "the the the cat"), 262, [])
    assert merges == [(b"t", b"h"), (b"th", b"e"), (b" ", b"the"), (b"c", b"a"), (b"ca", b"t"), (b" ", b"cat")]
    assert vocab[256] == b"th" and vocab[261] == b" cat" and len(vocab) == 262


def test_id_layout_specials_after_bytes(tmp_path):
    vocab, merges = train_bpe(_write(tmp_path, f"aaa{EOT}aaa<|pad|>"), 300, [EOT, "<|pad|>"])
    assert [vocab[i] for i in range(256)] == [bytes([i]) for i in range(256)]
    assert vocab[256] == EOT.encode() and vocab[257] == b"<|pad|>"
    assert merges == [(b"a", b"a"), (b"aa", b"a")]  # specials are never merged: '<|' etc. do not appear
    assert vocab[258] == b"aa" and vocab[259] == b"aaa" and len(vocab) == 260  # stopped: no pair left


def test_reverse_key_orders_bytes_descending():
    items = [b"a", b"ab", b"b", b" ", b"\xff", b"ba"]
    assert sorted(items, key=_reverse_key) == sorted(items, reverse=True)


def _naive_bpe(text: str, num_merges: int, specials: list[str]) -> list[tuple[bytes, bytes]]:
    """Recount every pair after every merge: slow, obviously right."""
    words = Counter(pretokens(text, special_regex(specials)))
    state = {tuple(bytes([b]) for b in w.encode()): c for w, c in words.items()}
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, c in state.items():
            for p in zip(w, w[1:], strict=False):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new_state: Counter = Counter()
        for w, c in state.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_state[tuple(out)] += c
        state = new_state
    return merges


def test_matches_naive_reference_on_corpus(tmp_path):
    text = (FIXTURES / "corpus.en").read_text(encoding="utf-8")[:30000] + EOT + "the end"
    _, merges = train_bpe(_write(tmp_path, text), 257 + 150, [EOT], num_workers=1)
    assert merges == _naive_bpe(text, 150, [EOT])


@pytest.mark.parametrize("path", [FIXTURES / "corpus.en", SAMPLE], ids=["corpus.en", "tinystories"])
def test_workers_do_not_change_merges(path):
    one = train_bpe(path, 3000, [EOT], num_workers=1)
    two = train_bpe(path, 3000, [EOT], num_workers=2)
    assert one == two
    assert len(one[1]) == 3000 - 257


@pytest.mark.parametrize(
    "path,vocab_size", [(FIXTURES / "corpus.en", 5000), (SAMPLE, 10000)], ids=["corpus.en", "tinystories"]
)
def test_compression_within_1pct_of_hf_and_roundtrip(tmp_path, path, vocab_size):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    vocab, merges = train_bpe(path, vocab_size, [EOT], num_workers=2)
    ours = Tokenizer(vocab, merges, [EOT])
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train([str(path)], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    text = path.read_text(encoding="utf-8")
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    n_bytes = len(text.encode("utf-8"))
    ours_bpt = n_bytes / len(ids)
    hf_bpt = n_bytes / len(hf.encode(text).ids)
    assert abs(ours_bpt / hf_bpt - 1) < 0.01, (ours_bpt, hf_bpt, ours.vocab_size, hf.get_vocab_size())


def test_bad_input(tmp_path):
    good = _write(tmp_path, "hello world")
    with pytest.raises(ValueError, match="vocab_size=256.*at least 257"):
        train_bpe(good, 256, [EOT])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe(tmp_path / "missing.txt", 300, [EOT])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        train_bpe(empty, 300, [EOT])
    only_special = tmp_path / "special.txt"
    only_special.write_text(EOT * 3)
    with pytest.raises(ValueError, match="no text outside special tokens"):
        train_bpe(only_special, 300, [EOT])
    with pytest.raises(ValueError, match="prefix"):
        train_bpe(good, 300, ["<|end", EOT])
    with pytest.raises(ValueError, match="twice"):
        train_bpe(good, 300, [EOT, EOT])


def test_merge_bar_ends_full_when_pairs_run_out(tmp_path, capsys):
    # 3 merges are possible ("aa", "aaa", " aaa") where 43 were asked: the bar's last frame must read 3/3, 100%.
    train_bpe(_write(tmp_path, "aaa aaa aaa"), 300, [EOT], num_workers=1, progress=True)
    frames = [f.strip() for f in capsys.readouterr().err.replace("\n", "\r").split("\r") if f.startswith("merges")]
    assert frames, "no merge progress bar was drawn"
    assert "100%" in frames[-1] and "3/3" in frames[-1], frames[-1]
