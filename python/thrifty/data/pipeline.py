"""From raw text to packed train/validation token streams, cached in the run directory.

    bundle = prepare_data(data=None, cache_dir="runs/x", seq_len=256)   # None: embedded default
    bundle.train.batch([0, 1])  # input_ids / labels / positions / cu_seqlens
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from thrifty.data import tokenizer as tokmod
from thrifty.data.packing import PackedDataset, pack_documents
from thrifty.data.preprocess import FilterConfig, preprocess, with_progress
from thrifty.data.sources import (DataError, Document, default_corpus_files, list_files, load_default_corpus,
                                  load_documents, replace_text)

log = logging.getLogger("thrifty.data")
CACHE_VERSION = 1


@dataclass
class DataBundle:
    tokenizer: object
    train: PackedDataset
    val: PackedDataset
    stats: dict = field(default_factory=dict)
    tokenizer_path: Path | None = None


def _fingerprint(files: list[Path], extra: dict) -> str:
    # resolved paths: the same corpus named relatively, absolutely or through a link is the same cache
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# A document longer than this (a whole corpus in one .txt, a giant .jsonl record) is cut into parts of about
# SPLIT_PART_CHARS at line breaks: the filters, near-dup shingling and the tokenizer hold several copies of
# a document at once (~30x its size for one of 300 MB), parts bound that. Each part is a document of its own.
SPLIT_DOC_CHARS = 8 << 20
SPLIT_PART_CHARS = 1 << 20


def _split_huge(docs: list[Document], say) -> list[Document]:
    out = []
    for d in docs:
        if d.text is None or len(d.text) <= SPLIT_DOC_CHARS:
            out.append(d)
            continue
        text, start, parts = d.text, 0, 0
        while start < len(text):
            end = min(len(text), start + SPLIT_PART_CHARS)
            if len(text) - end < SPLIT_PART_CHARS // 4:  # a short rest joins this part (alone it could be too short)
                end = len(text)
            if end < len(text):  # after the part's last line break (else its last space), when it has one
                cut = text.rfind("\n", start, end)
                cut = cut if cut > start else text.rfind(" ", start, end)
                end = cut + 1 if cut > start else end
            out.append(Document(text[start:end], d.source))
            start, parts = end, parts + 1
        say(f"data: {d.source}: one document of {len(text) / 2**20:.0f} M characters, read as {parts} parts of "
            f"about {SPLIT_PART_CHARS >> 20} M characters cut at line breaks")
    return out


def _encode(tok, texts: list[str], say, chunk: int = 1024) -> list[np.ndarray]:
    """Token ids of each text (int32 arrays), encoded a chunk of texts at a time: the tokenizers library's
    Encoding objects (offsets, token strings, masks: ~250 B per token) live for one chunk only."""
    encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch  # _fast (tokenizers >= 0.20.2): no offsets
    out: list[np.ndarray] = []
    for i in with_progress(range(0, len(texts), chunk), say, "tokenize", len(texts), chunk):
        out.extend(np.asarray(e.ids, dtype=np.int32) for e in encode(texts[i:i + chunk]))
    return out


def _split_one(text: str, val_fraction: float) -> tuple[list[str], list[str]]:
    """A lone document (one .txt file: a book, tinyshakespeare's input.txt) is split in two: its last
    ``val_fraction`` held out, cut at the line break (else the space) nearest that point within a quarter of
    the held-out length of it (else right there), so the shares stay close to the fraction asked for."""
    n = len(text.rstrip())  # trailing blank lines are no text to hold out
    at = int(round(n * (1 - val_fraction)))
    if not 0 < at < n:
        return [text], []
    slack = max(1, (n - at) // 4)
    for sep in ("\n", " "):
        cuts = [i + 1 for i in (text.rfind(sep, max(0, at - slack), at), text.find(sep, at, at + slack))
                if 0 <= i < n - 1]
        if cuts:
            at = min(cuts, key=lambda c: abs(c - at))
            break
    return [text[:at]], [text[at:]]


def _split_tail(texts: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """The parts of one document (in order, :func:`_split_huge`): its last ``val_fraction`` of characters held
    out, as :func:`_split_one` holds out a lone document's tail; the part it starts in is cut at a line break."""
    need = val_fraction * sum(len(t) for t in texts)
    k, tail = len(texts), 0
    while k > 1 and tail + len(texts[k - 1]) <= need:
        k -= 1
        tail += len(texts[k])
    if need <= tail:
        return texts[:k], texts[k:]
    head, cut = _split_one(texts[k - 1], (need - tail) / len(texts[k - 1]))
    return texts[:k - 1] + head, cut + texts[k:]


def _split(texts: list[str], val_fraction: float, one_document: bool = False) -> tuple[list[str], list[str]]:
    """Held-out split by a hash of each document (stable whatever the order or the other documents); a
    single document (or the parts of one, ``one_document``) is split at a line break instead (:func:`_split_one`)."""
    if val_fraction <= 0 or not texts:
        return texts, []
    if one_document and len(texts) > 1:
        return _split_tail(texts, val_fraction)
    if len(texts) == 1:
        return _split_one(texts[0], val_fraction)
    key = [int.from_bytes(hashlib.sha1(t.encode("utf-8", "replace")).digest()[:4], "little") / 2**32 for t in texts]
    val = [t for t, k in zip(texts, key) if k < val_fraction]
    train = [t for t, k in zip(texts, key) if k >= val_fraction]
    if not val:  # at least one held-out document
        i = int(np.argmin(key))
        val, train = [texts[i]], texts[:i] + texts[i + 1:]
    if not train:
        i = int(np.argmax(key))
        train, val = [texts[i]], [t for j, t in enumerate(texts) if j != i]
    return train, val


def prepare_data(data: str | os.PathLike | None, cache_dir: str | os.PathLike, seq_len: int, *,
                 tokenizer: str | os.PathLike | None = None, vocab_size: int = 8192, val_fraction: float = 0.05,
                 filter_config: FilterConfig | None = None, near_dup: bool = True, scrub_pii: bool = True,
                 text_field: str = "text", default_caps: dict | None = None, log_fn=None) -> DataBundle:
    """Loads, cleans, tokenizes and packs ``data`` (None: the embedded standard-library corpus).

    The tokenizer is loaded from ``tokenizer`` (a tokenizer.json or a directory holding one) or
    trained (byte-level BPE, ``vocab_size``) and saved as ``cache_dir/tokenizer.json``; the token
    streams are cached under ``cache_dir/data/`` and reused while the sources, the tokenizer and
    the options are unchanged. Raises :class:`DataError` on missing/empty data.
    """
    say = log_fn or log.info
    if not 0 <= val_fraction < 1:  # NaN too
        raise DataError(f"val_fraction: expected a fraction in [0, 1) (0: no validation split), got {val_fraction}")
    # options that would fail only after the whole corpus was read, cleaned and tokenized: before any work
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len: expected a number of tokens >= 2, got {seq_len!r}")
    if tokenizer is None:
        try:
            tokmod.check_vocab_size(vocab_size)
        except ValueError as e:
            raise DataError(str(e)) from None
    cache_dir = Path(cache_dir)
    cfg = filter_config or FilterConfig()
    try:
        cfg.validate()
    except ValueError as e:
        raise DataError(str(e)) from None
    files = list_files(data) if data is not None else default_corpus_files(**(default_caps or {}))
    tok_src = Path(tokenizer) if tokenizer is not None else None
    if tok_src is not None and tok_src.is_dir():
        tok_src = tok_src / "tokenizer.json"
    if tok_src is not None and not tok_src.is_file():
        raise DataError(f"--tokenizer: no tokenizer.json at {str(tok_src)!r}")
    tok_hash = hashlib.sha256(tok_src.read_bytes()).hexdigest()[:16] if tok_src else None
    given_tok = tokmod.load_tokenizer(tok_src) if tok_src is not None else None  # a bad file fails before any work
    fp = _fingerprint(files, {"v": CACHE_VERSION, "tok": tok_hash, "vocab": vocab_size, "val": val_fraction,
                              "filters": asdict(cfg), "near": near_dup, "scrub": scrub_pii, "field": text_field,
                              "data": str(Path(data).resolve()) if data is not None else None})
    ddir = cache_dir / "data"
    meta_path = ddir / "meta.json"
    tok_out = cache_dir / "tokenizer.json"
    if meta_path.is_file() and tok_out.is_file():
        cached = _load_cache(ddir, tok_out, fp, seq_len, say)
        if cached is not None:
            return cached

    t0 = time.perf_counter()
    src_desc = str(data) if data is not None else f"embedded default corpus (Python standard library, {len(files)} files)"
    say(f"data: reading {src_desc}")
    if data is None:
        docs = load_default_corpus(**(default_caps or {}))
    else:
        docs = load_documents(data, text_field)
    one_document = len(docs) == 1  # a lone document is held out by its tail, also when read as parts
    docs = _split_huge(docs, say)
    try:
        texts, stats = preprocess(docs, cfg, near_dup=near_dup, scrub_pii=scrub_pii, log_fn=say)
    except ImportError as err:  # datasketch, needed only once there are two documents to compare
        raise DataError(f"{err} (the 'train' extra: pip install 'thrifty[train]')") from err
    del docs  # the raw texts: the cleaned ones are new strings
    if not texts:
        raise DataError(f"no text left after filtering {stats['documents_in']} documents from {src_desc}: "
                        + _drop_summary(stats, cfg))
    train_txt, val_txt = _split(texts, val_fraction, one_document)
    if (len(texts) == 1 or one_document) and val_txt:
        held, total = sum(len(t) for t in val_txt), sum(len(t) for t in texts)
        say(f"data: one document: its last {held} characters ({100 * held / total:.1f}%) held out for validation")
    if given_tok is not None:
        tok = given_tok
        say(f"tokenizer: loaded {tok_src} (vocab {tokmod.vocab_size(tok)})")
    else:
        t1 = time.perf_counter()
        tok = train_tokenizer_for(train_txt, vocab_size)
        say(f"tokenizer: trained byte-level BPE, vocab {tokmod.vocab_size(tok)} in {time.perf_counter() - t1:.1f} s")
    eos = tokmod.eos_id(tok)
    t1 = time.perf_counter()
    tr_stream, tr_starts = pack_documents(_encode(tok, train_txt, say), eos)
    va_stream, va_starts = pack_documents(_encode(tok, val_txt, say), eos)
    say(f"tokenize + pack: {len(tr_stream) + len(va_stream)} tokens in {time.perf_counter() - t1:.1f} s")
    stats.update(train_documents=len(train_txt), val_documents=len(val_txt), train_tokens=int(len(tr_stream)),
                 val_tokens=int(len(va_stream)), vocab_size=tokmod.vocab_size(tok),
                 prep_seconds=round(time.perf_counter() - t0, 2))
    say(f"data: {len(train_txt)} train / {len(val_txt)} validation documents, {len(tr_stream)} / {len(va_stream)} tokens "
        f"({stats['prep_seconds']} s)")
    # write: tokenizer (unless given), then streams, then meta last (its presence marks a complete cache)
    ddir.mkdir(parents=True, exist_ok=True)
    tokmod.save_tokenizer(tok, cache_dir, source=tok_src)  # a given tokenizer keeps its tokenizer_config.json
    tmp = ddir / ".streams.tmp.npz"
    np.savez(tmp, train=tr_stream, train_starts=tr_starts, val=va_stream, val_starts=va_starts)
    os.replace(tmp, ddir / "streams.npz")
    # the tokenizer the streams were encoded with: a run killed between the tokenizer's and the meta's writes
    # leaves another run's meta next to this tokenizer, which the load then refuses
    replace_text(meta_path, json.dumps({"fingerprint": fp, "stats": stats, "source": src_desc,
                                        "tokenizer_sha256": _file_sha256(tok_out)}, indent=1))
    return DataBundle(tok, PackedDataset(tr_stream, tr_starts, seq_len), _val_dataset(va_stream, va_starts, seq_len),
                      stats, cache_dir / "tokenizer.json")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_cache(ddir: Path, tok_out: Path, fp: str, seq_len: int, say) -> DataBundle | None:
    """The cached bundle when its fingerprint matches; None when it does not, or when a cache file is
    unreadable (deleted, truncated, edited): the data is then prepared again, not a traceback."""
    try:
        meta = json.loads((ddir / "meta.json").read_text())
        if not isinstance(meta, dict) or meta.get("fingerprint") != fp:
            return None
        # (a cache written before meta.json recorded the tokenizer's hash is taken as it is)
        if "tokenizer_sha256" in meta and meta["tokenizer_sha256"] != _file_sha256(tok_out):
            say(f"data: the tokenized cache in {ddir} was encoded with another tokenizer.json than {tok_out} (a "
                "preparation stopped half-way); preparing again")
            return None
        tok = tokmod.load_tokenizer(tok_out)
        with np.load(ddir / "streams.npz") as z:
            arrays = {k: z[k] for k in ("train", "train_starts", "val", "val_starts")}
        bundle = DataBundle(tok, PackedDataset(arrays["train"], arrays["train_starts"], seq_len),
                            _val_dataset(arrays["val"], arrays["val_starts"], seq_len), meta["stats"], tok_out)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:  # DataError, JSON too
        say(f"data: the tokenized cache in {ddir} is unreadable ({type(e).__name__}: {str(e)[:120]}); preparing again")
        return None
    say(f"data: reusing the tokenized cache in {ddir} ({bundle.stats.get('train_tokens')} train tokens)")
    return bundle


_DROP_ADVICE = {
    "too_short": "give longer documents (at least {min_chars} characters)",
    "mostly_non_text": "give text, not symbols, minified code or data blobs",
    "repetitive": "give documents that do not repeat the same lines",
    "binary_or_non_utf8": "give UTF-8 text files",
    "malformed_json": "fix the .jsonl lines that are not valid JSON (one object per line)",
    "no_text_field": "give every .jsonl record the text field (or name the field with --text-field)",
    "text_not_a_string": "give the text field as a string (not null, a number or a list)",
    "exact_duplicates": "give distinct documents",
    "near_duplicates": "give distinct documents",
}


def _drop_summary(stats: dict, cfg: FilterConfig) -> str:
    """Why nothing was left: the drop reasons, most frequent first, and what to change for the dominant
    ones (a filter that dropped everything needs other data, not more of the same)."""
    drops = dict(stats.get("quality_dropped", {}))
    for k in ("exact_duplicates", "near_duplicates"):
        if stats.get(k):
            drops[k] = stats[k]
    if not drops:
        return "no documents to read; give more documents"
    ranked = sorted(drops.items(), key=lambda kv: -kv[1])
    top = [k for k, v in ranked if v >= ranked[0][1] / 2]  # the dominant reason(s)
    advice = []
    for k in top:
        a = _DROP_ADVICE.get(k, "").format(min_chars=cfg.min_chars)
        if a and a not in advice:
            advice.append(a)
    return ("dropped as " + ", ".join(f"{k.replace('_', ' ')} ({v})" for k, v in ranked)
            + (f"; {'; '.join(advice)}" if advice else ""))


def train_tokenizer_for(texts: list[str], vocab_size: int):
    return tokmod.train_tokenizer(texts, vocab_size=vocab_size)


def _val_dataset(stream, starts, seq_len) -> PackedDataset:
    # a short held-out split still gives one (shorter) row
    n = len(stream)
    return PackedDataset(stream, starts, seq_len if n >= seq_len or n < 2 else n) if n >= 2 else PackedDataset(stream, starts, seq_len)
