"""Text sources: a directory of .txt / .jsonl ("text" field) / .parquet (a text column) files,
a single such file, or the embedded default corpus (the Python standard library's own source).

Every loader yields :class:`Document` objects; what cannot be used is kept as ``text=None`` with a
reason, so the preprocessing step can count it:

- ``binary_or_non_utf8``: bytes that are not UTF-8 or look binary (a file, a .jsonl line, a parquet binary cell);
- ``malformed_json``: a .jsonl line that is not JSON;
- ``no_text_field``: a .jsonl record that is not an object or has no text field (a file where no record has
  it is an error instead: the wrong ``text_field``, most likely);
- ``text_not_a_string``: a text field or parquet cell that is null, a number, a list or an object.
"""
from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


def replace_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temp file and a rename: readers never see half a file, and an
    existing file is replaced, never rewritten in place (a failed training start restores RUN_DIR from hard
    links of what was there). The temp name matches the trainer's stale-temp sweep (``.tmp-*``)."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class DataError(ValueError):
    """Bad or unusable training data (missing path, empty corpus, unreadable format)."""


@dataclass
class Document:
    text: str | None
    source: str
    rejected: str | None = None


TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py"}
SUPPORTED = sorted(TEXT_SUFFIXES | {".jsonl", ".parquet"})


def _decode(raw: bytes, source: str) -> Document:
    if b"\x00" in raw:  # text has no NUL anywhere (UTF-16 text is full of them): one memchr over the bytes
        return Document(None, source, "binary_or_non_utf8")
    try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the text
        return Document(raw.decode("utf-8-sig"), source)
    except UnicodeDecodeError:
        return Document(None, source, "binary_or_non_utf8")


def _from_value(t, source: str) -> Document:
    """The document of a .jsonl text field or a parquet cell: a string, UTF-8 bytes, or a reason."""
    if isinstance(t, str):
        # a NUL ("\u0000" in JSON) is a binary blob stored as a string, as in a file
        return Document(t, source) if "\x00" not in t else Document(None, source, "binary_or_non_utf8")
    if isinstance(t, (bytes, bytearray)):  # a parquet binary column holding (UTF-8) text
        return _decode(bytes(t), source)
    return Document(None, source, "text_not_a_string")


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    records = with_field = 0
    first_without = None
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            src = f"{path}:{lineno}"
            if b"\x00" in line:  # binary, or UTF-16/32 text (NUL in every other byte): not UTF-8 JSON
                yield Document(None, src, "binary_or_non_utf8")
                continue
            try:  # decoded here: json.loads of bytes would guess UTF-16/32 and read a UTF-16 file's first line
                # (utf-8-sig on every line: concatenated files keep each one's byte-order mark)
                obj = json.loads(line.decode("utf-8-sig"))
            except UnicodeDecodeError:
                yield Document(None, src, "binary_or_non_utf8")
                continue
            except (json.JSONDecodeError, RecursionError):  # a broken line among good ones (or one nested
                # deeper than the parser recurses): counted and dropped, not fatal
                yield Document(None, src, "malformed_json")
                continue
            records += 1
            if not isinstance(obj, dict) or text_field not in obj:
                if first_without is None:
                    first_without = (f"{src}: expected a JSON object with a {text_field!r} field, got {type(obj).__name__}"
                                     f"{' with keys ' + str(sorted(obj)[:8]) if isinstance(obj, dict) else ''}")
                yield Document(None, src, "no_text_field")  # one odd record among good ones: counted, not fatal
                continue
            with_field += 1
            yield _from_value(obj[text_field], src)
    if records and not with_field:  # no record has the field: the wrong field name, not odd records
        raise DataError(f"{first_without} (and no record in the file has one; choose the field with text_field / "
                        "--text-field)")


def _read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"{path}: reading parquet needs pyarrow, which is not installed "
                        "(pip install pyarrow), or convert the data to .jsonl/.txt") from err
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid (a ValueError) / ArrowIOError (an OSError)
        raise DataError(f"{path}: not a readable parquet file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if text_field not in table.column_names:
        raise DataError(f"{path}: no {text_field!r} column in the parquet file; columns are {table.column_names}")
    for i, t in enumerate(table.column(text_field).to_pylist()):
        yield _from_value(t, f"{path}:{i}")


def read_file(path: Path, text_field: str = "text") -> Iterator[Document]:
    suf = path.suffix.lower()
    try:
        if suf == ".jsonl":
            yield from _read_jsonl(path, text_field)
        elif suf == ".parquet":
            yield from _read_parquet(path, text_field)
        else:
            yield _decode(path.read_bytes(), str(path))
    except OSError as err:  # permissions, I/O errors: name the file (an OSError alone often does not)
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from err


def _unsupported(p: Path) -> str:
    return (f"data file {str(p)!r}: unsupported type {p.suffix.lower() or '(no suffix)'!r}; supported: "
            f"{', '.join(SUPPORTED)} (plain text: name it .txt; JSON records: one object per line, as .jsonl)")


def list_files(path: str | os.PathLike) -> list[Path]:
    """The data files under ``path`` (a file or a directory, searched recursively), sorted. A file given
    directly must have a supported suffix, as the files found in a directory (others are skipped there); a
    directory that cannot be listed is an error, not a silent gap in the corpus."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist")
    if p.is_file():
        if p.suffix.lower() not in SUPPORTED:
            raise DataError(_unsupported(p))
        return [p]
    if not p.is_dir():
        raise DataError(f"data path {str(p)!r} is neither a file nor a directory")
    files = []
    seen_dirs = set()

    def unreadable(err: OSError):
        raise DataError(f"data directory {err.filename!r} cannot be listed ({err.strerror or err})") from err

    # os.walk with followlinks: a symlinked subdirectory is read too (Path.rglob skips it before Python 3.13);
    # each real directory once, so a link back up the tree cannot loop.
    for dirpath, dirnames, filenames in os.walk(p, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # hidden directories (.git, ...) skipped
        for name in filenames:
            f = Path(dirpath) / name
            if not name.startswith(".") and f.suffix.lower() in SUPPORTED and f.is_file():
                files.append(f)
    files.sort()
    if not files:
        raise DataError(f"data directory {str(p)!r} holds no data files (looked for {', '.join(SUPPORTED)})")
    return files


def load_documents(path: str | os.PathLike, text_field: str = "text") -> list[Document]:
    """Every document under ``path``; raises :class:`DataError` when there is none."""
    docs: list[Document] = []
    for f in list_files(path):
        docs.extend(read_file(f, text_field))
    if not docs:
        raise DataError(f"data path {str(path)!r} holds no documents (all files empty)")
    return docs


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__))


def default_corpus_files(max_files: int = 400, max_bytes: int = 4_000_000, max_file_bytes: int = 200_000) -> list[Path]:
    """The embedded default corpus: the standard library's own .py files (no tests, no site-packages),
    in a fixed order, capped so preprocessing stays a few seconds on 2 cores."""
    root = stdlib_dir()
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "turtledemo"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                files.append(Path(dirpath) / fn)
    out, total = [], 0
    for f in files:
        try:
            size = f.stat().st_size
        except OSError:
            continue
        if size > max_file_bytes:
            continue
        if total + size > max_bytes or len(out) >= max_files:
            break
        out.append(f)
        total += size
    if not out:
        raise DataError(f"found no Python source files under {root} for the embedded default corpus; pass --data")
    return out


def load_default_corpus(**caps) -> list[Document]:
    docs = []
    for f in default_corpus_files(**caps):
        docs.extend(read_file(f))
    return docs
