"""thrifty.data: filters, dedup, scrubbing, tokenizer, packing + cu_seqlens, sampler, pipeline cache."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from thrifty.data import (DataError, PackedDataset, ResumableSampler, default_corpus_files, eos_id, exact_dedup,
                          load_documents, load_tokenizer, near_dedup, pack_documents, prepare_data, preprocess,
                          quality_reason, save_tokenizer, scrub, train_tokenizer)
from thrifty.data.sources import Document

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega model train data token loss step").split()


def prose(seed: int, n_words: int = 200) -> str:
    r = random.Random(seed)
    lines = []
    for _ in range(n_words // 10):
        lines.append(" ".join(r.choice(WORDS) for _ in range(10)) + ".")
    return "\n".join(lines)


def write_corpus(d, n=24, words=200):
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"doc{i:02d}.txt").write_text(prose(i, words))
    return d


# ---- filters ----
def test_quality_filters():
    assert quality_reason(prose(0)) is None
    assert quality_reason("tiny") == "too_short"
    assert quality_reason("\n".join(["same line here"] * 40)) == "repetitive"
    assert quality_reason("ab" * 2000) == "mostly_non_text"  # one 4000-char line
    assert quality_reason("".join(chr(0x2500 + (i % 50)) for i in range(500))) == "mostly_non_text"


def test_long_line_prose_kept_blobs_dropped():
    """One long line is what a paragraph in a .jsonl "text" field looks like: prose passes, while minified
    code, base64/hex and number dumps on long lines are still "mostly_non_text"."""
    r = random.Random(0)
    para = " ".join(r.choice(WORDS) for _ in range(220)).capitalize() + "."
    assert len(para) > 1000 and "\n" not in para
    assert quality_reason(para) is None
    assert quality_reason("\u6211\u4eec\u8ba8\u8bba\u4e86\u9879\u76ee\u7684\u8fdb\u5c55\u548c\u8ba1\u5212\u3002" * 40
                          + "".join(chr(0x4e00 + r.randrange(2000)) for _ in range(800))) is None  # no spaces in CJK
    blob = bytes(r.randrange(256) for _ in range(1500))
    assert quality_reason(__import__("base64").b64encode(blob).decode()) == "mostly_non_text"
    assert quality_reason(blob.hex()) == "mostly_non_text"
    ident = lambda: "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randrange(1, 8)))  # noqa: E731
    minified = "".join(f"var {ident()}=function({ident()},{ident()}){{return {ident()}.{ident()}({ident()}*"
                       f"{r.randrange(999)})}};" for _ in range(60))
    assert quality_reason(minified) == "mostly_non_text"
    assert quality_reason(json.dumps([r.randrange(1000) for _ in range(400)])) == "mostly_non_text"
    # the same blobs wrapped in short lines (MIME's 76 characters, PEM's 64), with a header line of prose
    b64 = __import__("base64").b64encode(blob).decode()
    for width in (64, 76):
        wrapped = "Here is the attached file:\n" + "\n".join(b64[i:i + width] for i in range(0, len(b64), width))
        assert quality_reason(wrapped) == "mostly_non_text"
    assert quality_reason("\n".join(blob.hex()[i:i + 64] for i in range(0, 3000, 64))) == "mostly_non_text"
    # short-line text that is not blobs stays: code (long camelCase identifiers too), a table, CSV, URLs, a poem
    code = "\n".join(f"def {ident()}_{i}(self, {ident()}):\n    return self.{ident()}({ident()} + {i})" for i in range(30))
    java = "\n".join(f"    private final Map<String, List<TransactionAttributeSource{i}>> transactionAttributeSourceCache{i} "
                     "= new ConcurrentHashMap<>();" for i in range(12))
    python = "\n".join(f"    result_{i} = self.model_runner.execute_model(scheduler_output, intermediate_tensors=None)"
                       for i in range(12))
    table = "\n".join(f"| {r.choice(WORDS)} | {r.randrange(100)} | {r.choice(WORDS)} |" for _ in range(30))
    csv = "\n".join(f"{i},{i * 3.14159:.5f},{i * 2.71828:.5f},station_{i % 7},2024-01-{i % 28 + 1:02d}" for i in range(30))
    urls = "Links:\n" + "\n".join(f"https://github.com/example/project-{i}/blob/main/docs/setup.md" for i in range(10))
    poem = "\n".join(" ".join(r.choice(WORDS) for _ in range(6)) for _ in range(20))
    for text in (code, java, python, table, csv, urls, poem):
        assert quality_reason(text) is None, text[:80]


def test_no_text_left_names_the_drop_reason(tmp_path):
    """Nothing left after filtering: the message names why (here: not text), not "give longer documents"."""
    for i in range(3):
        (tmp_path / f"b{i}.txt").write_text(bytes(random.Random(i).randrange(256) for _ in range(900)).hex())
    with pytest.raises(DataError, match="no text left after filtering") as e:
        prepare_data(tmp_path, tmp_path / "r", seq_len=16)
    assert "mostly non text (3)" in str(e.value) and "longer" not in str(e.value)
    assert "minified code or data blobs" in str(e.value)


def test_malformed_jsonl_lines_counted_as_such(tmp_path):
    good = json.dumps({"text": "a perfectly ordinary line of text, " * 5})
    (tmp_path / "d.jsonl").write_bytes((good + "\n{not json\n" + good.replace("ordinary", "usual") + "\n").encode()
                                       + b'{"text": "caf\xe9"}\n')
    docs = load_documents(tmp_path / "d.jsonl")
    assert [d.rejected for d in docs] == [None, "malformed_json", None, "binary_or_non_utf8"]
    assert docs[1].source.endswith("d.jsonl:2")
    _, stats = preprocess(docs, near_dup=False)
    assert stats["quality_dropped"] == {"malformed_json": 1, "binary_or_non_utf8": 1}


def test_binary_and_non_utf8_dropped(tmp_path):
    write_corpus(tmp_path, 2)
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "latin1.txt").write_bytes(("caf\xe9 " * 50).encode("latin-1"))
    docs = load_documents(tmp_path)
    assert sorted(d.rejected or "" for d in docs) == ["", "", "binary_or_non_utf8", "binary_or_non_utf8"]
    texts, stats = preprocess(docs, near_dup=False)
    assert len(texts) == 2 and stats["quality_dropped"] == {"binary_or_non_utf8": 2}


def test_exact_and_near_dedup():
    a = prose(1, 300)
    words = a.split()
    words[150] = "CHANGED"
    near = " ".join(words)
    texts, n = exact_dedup([a, prose(2), a + "\n", a])
    assert n == 2 and len(texts) == 2
    kept, n = near_dedup([a, prose(2, 300), near, prose(3, 300)])
    assert n == 1 and kept == [a, prose(2, 300), prose(3, 300)]


def test_preprocess_counts(tmp_path):
    docs = [Document(prose(i), f"d{i}") for i in range(5)] + [Document(prose(0), "dup"), Document("x", "short")]
    texts, stats = preprocess(docs)
    assert len(texts) == 5
    assert stats["exact_duplicates"] == 1 and stats["quality_dropped"] == {"too_short": 1}
    assert stats["documents_in"] == 7 and stats["documents_out"] == 5


def test_scrub():
    t = ("mail jane.doe+x@example.co.uk or root@localhost.org; server 192.168.1.20 and 2001:db8::8a2e:370:7334, "
         "key AKIAIOSFODNN7EXAMPLE tok ghp_" + "a" * 36 + "\napi_key = \"zq81JHf7ad8s7f6a5s\"\n")
    out, c = scrub(t)
    assert "jane.doe" not in out and "192.168" not in out and "2001:db8" not in out
    assert "AKIA" not in out and "ghp_" not in out and "zq81" not in out
    assert out.count("<EMAIL>") == 2 and out.count("<IP_ADDRESS>") == 2 and c["secret"] == 3
    assert "api_key = \"<SECRET>\"" in out
    # code and versions are not addresses
    code = "x = a[1::2]; y = b[::3]; v = '3.11.7'; t = 12:30:45; f(d)\n"
    assert scrub(code)[0] == code
    assert scrub("999.1.1.1 is not an address")[0] == "999.1.1.1 is not an address"


def test_scrub_more_secret_forms():
    """Unquoted secret-named assignments, JSON keys, Stripe keys, bearer tokens / JWTs; code and short
    values are left alone."""
    secrets = {
        "export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY": "export AWS_SECRET_ACCESS_KEY=<SECRET>",
        '{"api_key": "0123456789abcdef0123456789abcdef"}': '{"api_key": "<SECRET>"}',
        "key sk_live_51H8abcdefghijklmnopqrstuvwx and rk_live_51H8abcdefghijklmnopqrstuvwx":
            "key <SECRET> and <SECRET>",
        "sk_test_4eC39HqLyjWDarjtT1zdp7dc": "<SECRET>",
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc123def456": "Authorization: Bearer <SECRET>",
        "-H 'Authorization: Bearer 8f14e45fceea167a5a36dedd4bea2543'": "-H 'Authorization: Bearer <SECRET>'",
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc123def456": "jwt <SECRET>",
        "API_TOKEN: a8Fk29dkLq0ZpX7wQ3": "API_TOKEN: <SECRET>",
    }
    for text, want in secrets.items():
        out, c = scrub(text)
        assert out == want and c["secret"] == want.count("<SECRET>"), (text, out)
    code = ("api_key = get_key()\npassword = None\ntoken = self.token\nsecret = \"short\"\nmax_tokens = 4096\n"
            "SECRET_KEY = os.environ[\"SECRET_KEY\"]\neos_token = tokenizer_v2_instance\npassword=hunter2\n"
            "api_key = load_key(path2048)\nnum_tokens = 12345678901234567890\nsk_live_short\n"
            '{"eos_token": "<|endoftext|>"}\nThe bearer of this letter is welcome. Bearer tokens go in a header.\n')
    assert scrub(code) == (code, {"email": 0, "ip": 0, "secret": 0})


# ---- tokenizer ----
def test_tokenizer_train_save_load(tmp_path):
    texts = [prose(i) for i in range(30)]
    tok = train_tokenizer(texts, vocab_size=400)
    assert tok.get_vocab_size() <= 400
    assert eos_id(tok) == 0
    s = "gamma delta ünïcödé 🙂 \t\n x"
    assert tok.decode(tok.encode(s).ids) == s  # byte level: any text round-trips
    save_tokenizer(tok, tmp_path)
    tok2 = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok2.encode(s).ids == tok.encode(s).ids
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, vocab_size=100)
    # a file that is not a tokenizer.json: DataError (tokenizers itself raises a plain Exception)
    for content in (b"garbage", b"\xff\xfe", b'{"model": {"type": "Nope"}}'):
        (tmp_path / "bad.json").write_bytes(content)
        with pytest.raises(DataError, match="tokenizer.json"):
            load_tokenizer(tmp_path / "bad.json")


# ---- packing ----
def test_packing_and_cu_seqlens():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16], [17]]
    stream, starts = pack_documents(docs, eos_id=0)
    assert stream.tolist() == [5, 6, 7, 0, 8, 9, 0, 10, 11, 12, 13, 14, 15, 16, 0, 17, 0]
    assert starts.tolist() == [0, 4, 7, 15]
    ds = PackedDataset(stream, starts, seq_len=5)
    assert len(ds) == 3
    b = ds.batch([0, 1])
    assert b["input_ids"].tolist() == [[5, 6, 7, 0, 8], [9, 0, 10, 11, 12]]
    # row 0: doc of 4 then a doc starting at 4; row 1: the tail of doc 2 (2 tokens) then doc 3
    assert b["cu_seqlens"].tolist() == [0, 4, 5, 7, 10] and b["cu_seqlens"].dtype == torch.int32
    assert b["positions"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2]]
    assert b["labels"].tolist() == [[5, 6, 7, 0, -100], [9, 0, -100, 11, 12]]
    assert b["max_seqlen"] == 4
    assert sum(ds.row_segments(2)) == 5


# ---- sampler ----
def test_sampler_deterministic_and_resumable():
    a = ResumableSampler(10, 4, seed=3)
    full = [a.next_batch() for _ in range(7)]
    again = ResumableSampler(10, 4, seed=3)
    assert [again.next_batch() for _ in range(7)] == full
    assert sorted(sum(full[:5], [])[:10]) == list(range(10))  # an epoch covers every row once
    b = ResumableSampler(10, 4, seed=3)
    for _ in range(3):
        b.next_batch()
    sd = json.loads(json.dumps(b.state_dict()))
    c = ResumableSampler(10, 4, seed=3)
    c.load_state_dict(sd)
    assert [c.next_batch() for _ in range(4)] == full[3:]
    assert ResumableSampler(10, 4, seed=4).next_batch() != full[0]
    assert ResumableSampler.shard([1, 2, 3, 4, 5, 6], 1, 2) == [2, 4, 6]
    with pytest.raises(ValueError, match="rows"):
        ResumableSampler(11, 4).load_state_dict(sd)


# ---- pipeline ----
def test_prepare_data_and_cache(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c", 20)
    (corpus / "dup.txt").write_text(prose(0))
    (corpus / "more.jsonl").write_text("\n".join(json.dumps({"text": prose(100 + i), "id": i}) for i in range(4)))
    msgs = []
    b = prepare_data(corpus, tmp_path / "run", seq_len=32, vocab_size=320, log_fn=msgs.append)
    assert b.stats["exact_duplicates"] == 1 and b.stats["documents_out"] == 24
    assert any("near-dup" in m for m in msgs) and any("privacy scrub" in m for m in msgs)
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    assert len(b.train) > 0 and len(b.val) > 0 and b.stats["val_documents"] >= 1
    msgs2 = []
    b2 = prepare_data(corpus, tmp_path / "run", seq_len=32, vocab_size=320, log_fn=msgs2.append)
    assert any("reusing" in m for m in msgs2)
    assert np.array_equal(b.train.stream, b2.train.stream)
    # a given tokenizer.json is used as is
    b3 = prepare_data(corpus, tmp_path / "run3", seq_len=32, tokenizer=tmp_path / "run" / "tokenizer.json", log_fn=msgs2.append)
    assert np.array_equal(b3.train.stream, b.train.stream)


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(tmp_path / "nope", tmp_path / "r", seq_len=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        prepare_data(tmp_path / "empty", tmp_path / "r", seq_len=16)
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("hi")
    with pytest.raises(DataError, match="no text left after filtering"):
        prepare_data(tmp_path / "short", tmp_path / "r", seq_len=16)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="'text' field"):
        prepare_data(tmp_path / "bad.jsonl", tmp_path / "r", seq_len=16)
    for vf in (2.0, -0.5):
        with pytest.raises(DataError, match="val_fraction"):
            prepare_data(tmp_path / "short", tmp_path / "r", seq_len=16, val_fraction=vf)
    assert not (tmp_path / "r").exists()
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(DataError, match="pyarrow"):
            prepare_data(tmp_path / "x.parquet", tmp_path / "r", seq_len=16)


def test_parquet_source(tmp_path):
    """A parquet file's text column (any name, via text_field) goes through the same pipeline as .txt
    files: same documents in, same token stream out; a null cell is dropped as non-text."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [prose(i) for i in range(12)]
    table = pa.table({"id": list(range(13)), "body": texts + [None]})
    pq.write_table(table, tmp_path / "docs.parquet")
    docs = load_documents(tmp_path / "docs.parquet", text_field="body")
    assert [d.text for d in docs[:12]] == texts and docs[12].rejected == "binary_or_non_utf8"
    tok = tmp_path / "tok"
    save_tokenizer(train_tokenizer(texts, vocab_size=320), tok)
    b = prepare_data(tmp_path / "docs.parquet", tmp_path / "run", seq_len=32, tokenizer=tok, text_field="body",
                     near_dup=False, val_fraction=0.0)
    txt = write_corpus(tmp_path / "txt", 12)
    b_txt = prepare_data(txt, tmp_path / "run_txt", seq_len=32, tokenizer=tok, near_dup=False, val_fraction=0.0)
    assert b.stats["documents_in"] == 13 and b.stats["documents_out"] == 12
    assert np.array_equal(b.train.stream, b_txt.train.stream)
    with pytest.raises(DataError, match="no 'text' column"):
        prepare_data(tmp_path / "docs.parquet", tmp_path / "r2", seq_len=32, tokenizer=tok)
    assert not (tmp_path / "r2").exists()


def test_default_corpus_is_stdlib():
    files = default_corpus_files(max_files=50, max_bytes=500_000)
    assert 0 < len(files) <= 50 and all(f.suffix == ".py" for f in files)
    assert sum(f.stat().st_size for f in files) <= 500_000
    assert not any("site-packages" in str(f) for f in files)
