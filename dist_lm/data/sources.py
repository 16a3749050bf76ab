"""Text sources: the bundled TinyStories sample, local files, and `datasets` hub names.

Design decisions:
- Every source is read as a stream of documents (`Iterator[str]`) split into `train` and `val`,
  so a 12 GB corpus never has to fit in memory.
- Local `.txt` files separate documents with `<|endoftext|>` lines (the TinyStories release
  format); `.jsonl` and `.parquet` hold one document per row in `text_field`.
- Where a source has no validation split, the last `val_fraction` of the documents is held out
  (local files, whose document count is cheap to know), or every k-th document of a streamed hub
  split (k = round(1 / val_fraction)), which needs no count.
- A source name that exists on disk is a local file, or, for a directory, a dataset in any layout
  `datasets` reads (e.g. a downloaded hub repository); `bundled:tinystories` is the package's sample;
  anything else that looks like `owner/name` is a `datasets` hub name. Directories and hub names go
  through the same streaming code, so the hub path is tested offline on a local directory.
- A document must be a string: a jsonl line that is not an object, or whose text field is null, a number, a
  list or missing, is one error naming the file, the line and data.text_field (a parquet or hub row: the row
  number), raised as the row is read, instead of a TypeError deep inside the tokenizer's workers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from dist_lm.errors import UserError

BUNDLED_SOURCES = {"bundled:tinystories": "tinystories_sample.txt"}
DOC_SEPARATOR = "<|endoftext|>"
SPLITS = ("train", "val")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def bundled_path(name: str) -> Path:
    """Filesystem path of a bundled sample, e.g. bundled_path('bundled:tinystories')."""
    if name not in BUNDLED_SOURCES:
        raise UserError(f"unknown bundled source {name!r}; accepted: {', '.join(BUNDLED_SOURCES)}")
    path = Path(str(resources.files("dist_lm.data") / "samples" / BUNDLED_SOURCES[name]))
    if not path.is_file():
        raise FileNotFoundError(f"bundled sample {path} is missing from the installation; reinstall dist_lm")
    return path


def iter_documents(source: str, split: str, *, text_field: str = "text",
                   val_fraction: float = 0.05) -> Iterator[str]:
    """Yield the documents of one split ('train' or 'val') of a source, in a fixed order."""
    if split not in SPLITS:
        raise UserError(f"split {split!r} is not accepted; use one of {SPLITS}")
    if source.startswith("bundled:"):
        return _split_local(bundled_path(source), split, text_field, val_fraction)
    path = Path(source).expanduser()
    if path.is_dir():
        return _iter_hub(str(path), split, text_field, val_fraction)
    if path.exists():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"data source {path} has suffix {path.suffix!r}; accepted: {', '.join(LOCAL_SUFFIXES)}")
        return _split_local(path, split, text_field, val_fraction)
    if path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"data source {source} does not exist; pass an existing .txt/.jsonl/.parquet file, "
                                "'bundled:tinystories', or a datasets hub name such as roneneldan/TinyStories")
    return _iter_hub(source, split, text_field, val_fraction)


def _read_local(path: Path, text_field: str) -> Iterator[str]:
    """Documents of a local file; a file that cannot be decoded is a UserError naming it."""
    try:
        yield from _read_local_documents(path, text_field)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from None


def _read_local_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield from _iter_txt_documents(path)
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno} is not valid JSON ({exc.msg}); fix or remove that "
                                    "line") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{lineno} is a JSON {type(row).__name__}, not an object with a "
                                    f"{text_field!r} field (data.text_field); fix or remove that line")
                if text_field not in row:
                    raise UserError(f"{path}:{lineno} has no field {text_field!r}; set data.text_field to one of "
                                    f"{sorted(row)}")
                yield _text(row[text_field], f"{path}:{lineno}", text_field)
    else:
        import pyarrow as pa  # datasets depends on pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
            if text_field not in table.schema_arrow.names:
                raise UserError(f"{path} has no column {text_field!r}; set data.text_field to one of "
                                f"{table.schema_arrow.names}")
            row = 0
            for batch in table.iter_batches(columns=[text_field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    yield _text(value, f"{path} row {row}", text_field)
                    row += 1
        except pa.ArrowException as exc:
            raise UserError(f"{path} is not a readable parquet file ({exc}); check or re-write it") from None


def _iter_txt_documents(path: Path) -> Iterator[str]:
    """Documents of a text file separated by `<|endoftext|>` (on its own line or inline), stripped."""
    pending: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            while DOC_SEPARATOR in line:
                head, _, line = line.partition(DOC_SEPARATOR)
                pending.append(head)
                doc = "".join(pending).strip()
                pending = []
                if doc:
                    yield doc
            pending.append(line)
    doc = "".join(pending).strip()
    if doc:
        yield doc


def _split_local(path: Path, split: str, text_field: str, val_fraction: float) -> Iterator[str]:
    # Two passes: one to count documents (cheap, streaming), one to yield the chosen split.
    num_docs = sum(1 for _ in _read_local(path, text_field))
    if num_docs == 0:
        raise UserError(f"data source {path} holds no documents; check the file and data.text_field")
    num_val = int(round(num_docs * val_fraction))
    if val_fraction > 0:
        num_val = max(1, num_val)
    if num_val >= num_docs:
        raise UserError(f"data source {path} has {num_docs} documents, too few to hold out "
                        f"val_fraction={val_fraction}; lower data.val_fraction or add text")
    first_val = num_docs - num_val
    for i, doc in enumerate(_read_local(path, text_field)):
        if (i >= first_val) == (split == "val"):
            yield doc


def _iter_hub(name: str, split: str, text_field: str, val_fraction: float) -> Iterator[str]:
    import datasets

    try:
        available = datasets.get_dataset_split_names(name)
    except Exception as exc:  # the hub client raises many types (connection, auth, not found)
        raise UserError(f"could not reach dataset {name!r} on the hub ({type(exc).__name__}: {exc}); "
                        "check the name and the network, or pass a local .txt/.jsonl/.parquet file") from None
    hub_val = next((s for s in ("validation", "valid", "val", "test") if s in available), None)
    if hub_val is not None:
        stream = datasets.load_dataset(name, split="train" if split == "train" else hub_val, streaming=True)
        for i, row in enumerate(stream):
            yield _field(row, text_field, name, i)
        return
    every = max(2, round(1 / val_fraction)) if val_fraction > 0 else 0
    stream = datasets.load_dataset(name, split="train", streaming=True)
    for i, row in enumerate(stream):
        is_val = every > 0 and i % every == every - 1
        if is_val == (split == "val"):
            yield _field(row, text_field, name, i)


def _field(row: dict, text_field: str, name: str, index: int) -> str:
    if text_field not in row:
        raise UserError(f"dataset {name} has no column {text_field!r}; set data.text_field to one of {sorted(row)}")
    return _text(row[text_field], f"dataset {name} row {index}", text_field)


def _text(value: object, where: str, text_field: str) -> str:
    """A document's text, or a UserError naming where it is and the field (data.text_field)."""
    if isinstance(value, str):
        return value
    shown = "null" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r})"
    raise UserError(f"{where}: field {text_field!r} (data.text_field) is {shown}, not text; fix or remove that "
                    "row, or set data.text_field to the text field")
