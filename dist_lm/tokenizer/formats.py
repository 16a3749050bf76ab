"""File formats: GPT-2 `vocab.json` + `merges.txt`, Hugging Face `tokenizer.json`, our config.

Design decisions:
- GPT-2 files spell each byte as a printable character (the byte-to-unicode table below) so that
  tokens are readable and never contain a space or newline; merges.txt is then "left right" per
  line. Special tokens are written as their literal text (GPT-2 writes "<|endoftext|>" that way),
  and on load a vocab entry that equals a declared special is read literally.
- tokenizer.json is the byte-level BPE that `tokenizers` itself writes: ByteLevel pre-tokenizer
  without prefix space (GPT-2's regex), BPE model with `ignore_merges: false` (so words found in the
  vocab still go through the merges, as ours do), specials as added tokens. Merges are written as
  pairs, not "a b" strings, so nothing depends on how a space would be escaped.
- Every reader raises ValueError/FileNotFoundError naming the file, the line or token, and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from dist_lm.errors import UserError

FORMAT_VERSION = 1
FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table.

    Bytes that are already printable and not a space stay themselves; the other 68 bytes are
    mapped, in byte order, to U+0100 onwards.

    >>> t = bytes_to_unicode(); t[ord("a")], t[ord(" ")], t[ord("\\n")]
    ('a', 'Ġ', 'Ċ')
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0x100
    for b in range(256):
        if b not in table:
            table[b] = chr(extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def token_to_str(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


def str_to_token(s: str, where: str) -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in s)
    except KeyError as e:
        raise UserError(
            f"{where}: token {s!r} has character {e.args[0]!r} outside GPT-2's byte-to-unicode table; "
            f"is this a byte-level BPE file? (declare it in special_tokens if it is a special token)"
        ) from None


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found; train one with launch/train_tokenizer.py")


def _not_utf8(path: Path, what: str, exc: UnicodeDecodeError) -> UserError:
    return UserError(f"{what} {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as "
                     "UTF-8")


def read_json(path: Path, what: str, fix: str):
    """The parsed JSON file; not UTF-8 or not JSON is one UserError naming the file (`fix` says what to do)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {str(path)!r} is not valid JSON ({e}); {fix}") from None
    except UnicodeDecodeError as e:
        raise _not_utf8(path, what, e) from None


def read_gpt2_vocab(path: str | os.PathLike, special_tokens: Sequence[str]) -> dict[int, bytes]:
    """vocab.json -> id -> bytes. Entries equal to a declared special are read literally."""
    path = Path(path)
    _check_file(path, "vocab file")
    raw = read_json(path, "vocab file", "re-save it")
    if not isinstance(raw, dict):
        raise UserError(f"vocab file {str(path)!r} must be a JSON object token -> id")
    specials = set(special_tokens)
    vocab: dict[int, bytes] = {}
    for s, i in raw.items():
        if not isinstance(i, int) or i < 0:
            raise UserError(f"vocab file {str(path)!r}: token {s!r} has id {i!r}; ids are integers >= 0")
        if i in vocab:
            raise UserError(f"vocab file {str(path)!r}: id {i} is used twice; each id must name one token")
        vocab[i] = s.encode("utf-8") if s in specials else str_to_token(s, str(path))
    return vocab


def read_gpt2_merges(path: str | os.PathLike) -> list[tuple[bytes, bytes]]:
    """merges.txt -> merges in order. A '#version' first line and blank lines are skipped."""
    path = Path(path)
    _check_file(path, "merges file")
    merges: list[tuple[bytes, bytes]] = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # as iterating the open file did (not splitlines)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, "merges file", e) from None
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise UserError(
                f"merges file {str(path)!r} line {lineno}: {line!r} is not two tokens separated by one space; "
                f"fix or remove that line"
            )
        where = f"merges file {str(path)!r} line {lineno}"
        merges.append((str_to_token(parts[0], where), str_to_token(parts[1], where)))
    return merges


def vocab_json(vocab: dict[int, bytes], special_tokens: Sequence[str]) -> dict[str, int]:
    """id -> bytes as GPT-2's token-string -> id mapping (specials literal)."""
    specials = {s.encode("utf-8"): s for s in special_tokens}
    special_ids = {i for i, b in vocab.items() if b in specials}
    out: dict[str, int] = {}
    for i in sorted(vocab):
        s = specials[vocab[i]] if i in special_ids else token_to_str(vocab[i])
        if s in out:
            raise UserError(
                f"token {s!r} (ids {out[s]} and {i}) would appear twice in vocab.json; "
                f"a special token collides with the byte-level spelling of a regular token: rename the special"
            )
        out[s] = i
    return out


def write_gpt2_files(directory: Path, vocab: dict[int, bytes], merges: Sequence[tuple[bytes, bytes]],
                     special_tokens: Sequence[str]) -> None:
    (directory / "vocab.json").write_text(
        json.dumps(vocab_json(vocab, special_tokens), ensure_ascii=False, indent=0) + "\n", encoding="utf-8"
    )
    lines = ["#version: 0.2"] + [f"{token_to_str(a)} {token_to_str(b)}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def hf_tokenizer_json(vocab: dict[int, bytes], merges: Sequence[tuple[bytes, bytes]],
                      special_ids: dict[str, int]) -> dict:
    """A `tokenizers` byte-level BPE definition giving the same ids as ours."""
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for s, i in sorted(special_ids.items(), key=lambda kv: kv[1])
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab_json(vocab, list(special_ids)),
            "merges": [[token_to_str(a), token_to_str(b)] for a, b in merges],
        },
    }


def write_config(directory: Path, special_tokens: Sequence[str]) -> None:
    cfg = {"format_version": FORMAT_VERSION, "special_tokens": list(special_tokens), "type": "byte_level_bpe"}
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def read_config(directory: Path) -> list[str]:
    """tokenizer_config.json -> special tokens, after checking type and format version."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} not found; a tokenizer directory holds {', '.join(FILES)} "
            f"(train one with launch/train_tokenizer.py, or save with Tokenizer.save)"
        )
    cfg = read_json(path, "tokenizer config", "re-save the tokenizer")
    if cfg.get("type") != "byte_level_bpe":
        raise UserError(
            f"{str(path)!r}: type {cfg.get('type')!r} is not 'byte_level_bpe'; this loader reads only that"
        )
    if cfg.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{str(path)!r}: format_version {cfg.get('format_version')!r} is not {FORMAT_VERSION}; "
            f"re-save it with this version of dist_lm"
        )
    specials = cfg.get("special_tokens", [])
    if not isinstance(specials, list) or not all(isinstance(s, str) and s for s in specials):
        raise UserError(f"{str(path)!r}: special_tokens must be a list of non-empty strings, got {specials!r}")
    return specials
