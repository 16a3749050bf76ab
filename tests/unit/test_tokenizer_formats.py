"""Files: save/load round trip, fingerprint, Hugging Face tokenizer.json parity, and bad files."""

import json
import shutil
from pathlib import Path

import pytest

from dist_lm.errors import UserError
from dist_lm.tokenizer import Tokenizer, load_tokenizer, train_bpe
from dist_lm.tokenizer.formats import bytes_to_unicode

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
SAMPLE = ROOT / "dist_lm" / "data" / "samples" / "tinystories_sample.txt"
SHIPPED = ROOT / "tokenizers" / "tinystories-10k"
EOT = "<|endoftext|>"
TEXTS = [
    "Once upon a time, there was a little girl named Lily.<|endoftext|>She liked to play.\n\n",
    "Größe 東京 😀  spaces   and\ttabs\n\n\n 1234 it's",
]


@pytest.fixture(scope="module")
def small() -> Tokenizer:
    vocab, merges = train_bpe(FIXTURES / "corpus.en", 1000, [EOT, "<|pad|>"], num_workers=1)
    return Tokenizer(vocab, merges, [EOT, "<|pad|>"])


def test_bytes_to_unicode_is_gpt2s_table():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0] == "Ā" and table[0xAD] == "Ń"


def test_save_load_roundtrip_and_fingerprint(tmp_path, small):
    small.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg == {"format_version": 1, "special_tokens": [EOT, "<|pad|>"], "type": "byte_level_bpe"}
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.vocab == small.vocab and loaded.merges == small.merges
    assert loaded.fingerprint() == small.fingerprint() == Tokenizer.load(tmp_path / "tok").fingerprint()
    for text in TEXTS:
        assert loaded.encode(text) == small.encode(text)
    # the fingerprint changes with any of merges, vocab, specials
    assert Tokenizer(small.vocab, small.merges[:-1], [EOT, "<|pad|>"]).fingerprint() != small.fingerprint()
    assert Tokenizer(small.vocab, small.merges, [EOT]).fingerprint() != small.fingerprint()


def test_gpt2_files_roundtrip_through_save(tmp_path):
    gpt2 = Tokenizer.from_files(FIXTURES / "gpt2" / "gpt2_vocab.json", FIXTURES / "gpt2" / "gpt2_merges.txt", [EOT])
    gpt2.save(tmp_path / "g")
    assert json.loads((tmp_path / "g" / "vocab.json").read_text()) == json.loads(
        (FIXTURES / "gpt2" / "gpt2_vocab.json").read_text())
    again = load_tokenizer(tmp_path / "g")
    assert again.merges == gpt2.merges and again.fingerprint() == gpt2.fingerprint()


@pytest.mark.parametrize("which", ["small", "shipped"])
def test_hf_tokenizer_json_gives_our_ids(tmp_path, small, which):
    from transformers import PreTrainedTokenizerFast

    from tokenizers import Tokenizer as HFTokenizer

    if which == "small":
        small.save(tmp_path / "tok")
        d = tmp_path / "tok"
    else:
        d = SHIPPED
    ours = load_tokenizer(d)
    hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    texts = TEXTS + [(FIXTURES / "corpus.en").read_text(encoding="utf-8")[:50000],
                     SAMPLE.read_text(encoding="utf-8")[:50000]]
    for text in texts:
        ids = ours.encode(text)
        assert hf.encode(text).ids == ids
        assert fast.encode(text) == ids
        assert hf.decode(ids, skip_special_tokens=False) == text


def test_missing_and_inconsistent_files(tmp_path, small):
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        load_tokenizer(tmp_path / "nope")
    d = tmp_path / "tok"
    small.save(d)
    (d / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(d)

    small.save(d)
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        load_tokenizer(d)

    # vocab and merges that disagree: merges from another tokenizer
    small.save(d)
    shutil.copy(FIXTURES / "gpt2" / "gpt2_merges.txt", d / "merges.txt")
    with pytest.raises(ValueError, match="vocab and merges disagree"):
        load_tokenizer(d)

    # malformed merges line
    small.save(d)
    lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
    lines[5] = "onlyonetoken"
    (d / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 6.*onlyonetoken"):
        load_tokenizer(d)

    # a stale tokenizer.json
    small.save(d)
    hf = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    hf["model"]["merges"] = hf["model"]["merges"][:-1]
    (d / "tokenizer.json").write_text(json.dumps(hf), encoding="utf-8")
    with pytest.raises(ValueError, match="disagrees"):
        load_tokenizer(d)

    # a vocab without all 256 bytes
    small.save(d)
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    del vocab["Ā"]
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="256 bytes"):
        load_tokenizer(d)

    # files that are not UTF-8, or not JSON: one UserError naming the file
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json"):
        small.save(d)
        (d / name).write_bytes(b"\xff\xfe not utf-8 \xe9")
        with pytest.raises(UserError, match=name.replace(".", r"\.")):
            load_tokenizer(d)


def test_shipped_card_matches_files():
    tok = load_tokenizer(SHIPPED)
    card = (SHIPPED / "README.md").read_text(encoding="utf-8")
    assert f"{tok.vocab_size:,}" in card and tok.fingerprint() in card
