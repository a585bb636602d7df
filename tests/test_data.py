"""thrifty.data: filters, dedup, scrubbing, tokenizer, packing + cu_seqlens, sampler, pipeline cache."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from thrifty.data import (DataError, FilterConfig, PackedDataset, ResumableSampler, default_corpus_files, eos_id, exact_dedup,
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
    t = ("mail jane.doe+x@example.co.uk or root@localhost.org; server 81.2.69.160 and 2a00:1450:4001:82b::200e, "
         "key AKIAIOSFODNN7EXAMPLE tok ghp_" + "a" * 36 + "\napi_key = \"zq81JHf7ad8s7f6a5s\"\n")
    out, c = scrub(t)
    assert "jane.doe" not in out and "81.2.69" not in out and "2a00:1450" not in out
    assert "AKIA" not in out and "ghp_" not in out and "zq81" not in out
    assert out.count("<EMAIL>") == 2 and out.count("<IP_ADDRESS>") == 2 and c["secret"] == 3
    assert "api_key = \"<SECRET>\"" in out
    # code and versions are not addresses
    code = "x = a[1::2]; y = b[::3]; v = '3.11.7'; t = 12:30:45; f(d)\n"
    assert scrub(code)[0] == code
    assert scrub("999.1.1.1 is not an address")[0] == "999.1.1.1 is not an address"


def test_scrub_ip_rule():
    """IPv4/IPv6 addresses (private ones too) are replaced; version strings, longer dotted runs, invalid octets
    and leading zeros stay."""
    scrubbed = {
        "connection from 81.2.69.160 refused": "connection from <IP_ADDRESS> refused",
        "GET / HTTP/1.1 from 203.0.114.7:8080.": "GET / HTTP/1.1 from <IP_ADDRESS>:8080.",
        "block 45.33.32.0/24 now": "block <IP_ADDRESS>/24 now",
        "(81.2.69.160)": "(<IP_ADDRESS>)",
        "ip 1.2.3.4 here": "ip <IP_ADDRESS> here",
        "server at 5.6.7.8": "server at <IP_ADDRESS>",
        "server 192.168.1.20": "server <IP_ADDRESS>",
        "host 10.0.0.1 and 127.0.0.1": "host <IP_ADDRESS> and <IP_ADDRESS>",
        "dns 8.8.8.8": "dns <IP_ADDRESS>",
        "see 2001:db8::8a2e:370:7334": "see <IP_ADDRESS>",
        "client 2a00:1450:4001:82b::200e said": "client <IP_ADDRESS> said",
        "build 1.0.0.7 on 81.2.69.160": "build 1.0.0.7 on <IP_ADDRESS>",
    }
    for text, want in scrubbed.items():
        out, c = scrub(text)
        assert out == want and c["ip"] == want.count("<IP_ADDRESS>"), (text, out)
    kept = ["version 2.0.1.3", "Version: 81.2.69.160", "release 10.2.3.4", "rev. 4.3.2.1 of the server",
            "v10.0.0.1", "firmware v2.13.0.4", "pip install foo==1.2.3.4", "bar>=10.0.0.1", "1.2.3.4.5", "10.1.2.3.4", "81.2.69.160.7", "x81.2.69.160",
            "a.81.2.69.160", "01.02.03.04", "81.2.69.0160", "256.1.1.1", "1.2.3", "::1", "at 12:30:45",
            "\u0661.\u0662.\u0663.\u0664 (Arabic-Indic digits)"]
    for text in kept:
        assert scrub(text) == (text, {"email": 0, "ip": 0, "secret": 0}), (text, scrub(text))


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
    files: same documents in, same token stream out; a null cell is dropped as text_not_a_string."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [prose(i) for i in range(12)]
    table = pa.table({"id": list(range(13)), "body": texts + [None]})
    pq.write_table(table, tmp_path / "docs.parquet")
    docs = load_documents(tmp_path / "docs.parquet", text_field="body")
    assert [d.text for d in docs[:12]] == texts and docs[12].rejected == "text_not_a_string"
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


# ---- bad input (an outside tester's audit) ----
def test_jsonl_lone_surrogates_and_deep_nesting(tmp_path):
    """A JSON "\\ud800" escape decodes to a lone surrogate, which no UTF-8 encoder takes: the document is dropped
    as binary_or_non_utf8 (it crashed near-dup removal and tokenizer training with UnicodeEncodeError); a line
    nested deeper than the parser recurses is malformed_json (a RecursionError traceback before)."""
    lines = [json.dumps({"text": prose(i)}) for i in range(6)]
    lines.insert(2, json.dumps({"text": prose(50) + " broken emoji \ud83d end"}))
    lines.insert(4, "[" * 100_000 + "]" * 100_000)
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    docs = load_documents(tmp_path / "d.jsonl")
    assert docs[4].rejected == "malformed_json" and docs[4].source.endswith("d.jsonl:5")
    assert quality_reason(docs[2].text) == "binary_or_non_utf8"
    texts, stats = preprocess(docs)
    assert len(texts) == 6 and stats["quality_dropped"] == {"binary_or_non_utf8": 1, "malformed_json": 1}
    kept, n = near_dedup(["short \udc00 one", "short \udc00 one", "another text"])  # public API: no crash either
    assert n == 1
    b = prepare_data(tmp_path / "d.jsonl", tmp_path / "run", seq_len=16, vocab_size=300, log_fn=lambda m: None)
    assert b.stats["documents_out"] == 6


def test_txt_byte_order_mark_not_in_text(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbf" + prose(1).encode())
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": prose(2)}).encode() + b"\n")
    docs = load_documents(tmp_path)
    assert [d.text for d in docs] == [prose(1), prose(2)]


def test_unreadable_parquet_is_a_data_error(tmp_path):
    pytest.importorskip("pyarrow.parquet")
    (tmp_path / "x.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match="x.parquet: not a readable parquet file"):
        load_documents(tmp_path / "x.parquet")


def test_scripts_with_combining_marks_are_text():
    """Indic vowel signs and viramas, Thai vowels and tones, Arabic harakat and the accents of decomposed (NFD)
    text are combining marks, not letters: Hindi, Tamil, Thai, vocalized Arabic and NFD Vietnamese were all
    dropped as mostly_non_text."""
    import unicodedata
    samples = {
        "hi": "भारत एक विशाल देश है जिसमें अनेक भाषाएँ बोली जाती हैं। यहाँ के लोग त्योहारों को बड़े उत्साह से मनाते हैं। "
              "गाँव में किसान सुबह जल्दी उठकर खेतों में काम करने जाते हैं।",
        "ta": "தமிழ் ஒரு பழமையான மொழியாகும், இது இந்தியாவிலும் இலங்கையிலும் பரவலாக பேசப்படுகிறது. "
              "பல இலக்கியங்கள் இந்த மொழியில் எழுதப்பட்டுள்ளன.",
        "th": "ประเทศไทยเป็นประเทศที่มีวัฒนธรรมที่หลากหลายและมีประวัติศาสตร์อันยาวนาน ผู้คนที่นี่มีความเป็นมิตรและยิ้มแย้มแจ่มใส "
              "อาหารไทยมีชื่อเสียงไปทั่วโลก",
        "ar": "ذَهَبَ الوَلَدُ إِلَى المَدْرَسَةِ فِي الصَّبَاحِ البَاكِرِ وَقَرَأَ كِتَابًا جَمِيلًا عَنِ التَّارِيخِ. "
              "ثُمَّ عَادَ إِلَى البَيْتِ وَتَنَاوَلَ الغَدَاءَ مَعَ أُسْرَتِهِ.",
        "vi": unicodedata.normalize("NFD", "Tiếng Việt là ngôn ngữ chính thức của Việt Nam, được sử dụng rộng rãi "
                                           "trong đời sống hằng ngày. Người dân thường uống cà phê vào buổi sáng."),
    }
    for lang, text in samples.items():
        assert quality_reason(text) is None, lang
        long_line = " ".join([text] * 8)  # a .jsonl paragraph: one line over max_mean_line_len (and repetitive)
        assert len(long_line) > 1000 and quality_reason(long_line) != "mostly_non_text", lang
    assert quality_reason("\u0301" * 300) == "mostly_non_text"  # marks alone are still not text
    assert quality_reason("\u200b" * 300) == "mostly_non_text"
    assert quality_reason(" ".join("Z\u0351\u036b\u0343\u036a\u0302" for _ in range(100))) == "mostly_non_text"


def test_absurd_filter_thresholds_rejected(tmp_path):
    """Out-of-range thresholds: a clear ValueError naming the parameter. max_shingles=0 / shingle_words=0 hashed
    every document to the same empty set and silently dropped distinct documents as near-duplicates; threshold
    1.0 and num_perm 1 failed inside datasketch with "number of bands are too small" / "Too few permutation"."""
    a, b = prose(1, 300), prose(2, 300)
    for kw, name in ((dict(threshold=1.0), "threshold"), (dict(threshold=0.0), "threshold"),
                     (dict(threshold=float("nan")), "threshold"), (dict(num_perm=1), "num_perm"),
                     (dict(shingle_words=0), "shingle_words"), (dict(max_shingles=0), "max_shingles")):
        with pytest.raises(ValueError, match=f"near_dedup {name}: expected"):
            near_dedup([a, b], **kw)
    assert near_dedup([a, b], shingle_words=1, max_shingles=1)[1] in (0, 1)  # the smallest valid values work
    for field, v in (("min_text_ratio", 2.0), ("min_chars", -1), ("near_dup_threshold", 1.5), ("num_perm", 0),
                     ("max_dup_line_frac", float("nan")), ("min_compress_ratio", -0.1), ("max_mean_line_len", 0)):
        with pytest.raises(ValueError, match=f"FilterConfig.{field}: expected"):
            FilterConfig(**{field: v})
    cfg = FilterConfig()
    cfg.near_dup_threshold = 1.0  # set after construction: preprocess and prepare_data check it too
    with pytest.raises(ValueError, match="near_dup_threshold"):
        preprocess([Document(a, "a")], cfg)
    corpus = write_corpus(tmp_path / "c", 4)
    with pytest.raises(DataError, match="near_dup_threshold"):
        prepare_data(corpus, tmp_path / "r", seq_len=16, filter_config=cfg)
    assert not (tmp_path / "r").exists()


def test_vocab_size_and_seq_len_checked_up_front(tmp_path):
    """--vocab-size 10**12 aborted the process inside `tokenizers` (a Rust allocation failure: no exception, no
    message); a bad seq_len failed only after the corpus was cleaned, tokenized and cached."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", "from thrifty.data import train_tokenizer\n"
                        "train_tokenizer(['hello world'], vocab_size=10**12)"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "ValueError: vocab_size: expected at most 1048576" in r.stderr, r.stderr[-2000:]
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["hello world"], vocab_size=400.5)
    corpus = write_corpus(tmp_path / "c", 4)
    for kw, what in ((dict(vocab_size=10**12), "vocab_size"), (dict(seq_len=1), "seq_len"),
                     (dict(seq_len=16.5), "seq_len")):
        args = {"seq_len": 16, **kw}
        with pytest.raises(DataError, match=what):
            prepare_data(corpus, tmp_path / "r", log_fn=lambda m: (_ for _ in ()).throw(AssertionError(m)), **args)
        assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("damage", ["meta_not_json", "streams_missing", "streams_junk", "tokenizer_junk"])
def test_unreadable_cache_is_rebuilt(tmp_path, damage):
    """A damaged tokenized cache (a file deleted, truncated or edited) is prepared again, not a traceback
    (JSONDecodeError, FileNotFoundError, numpy's pickle ValueError, or a DataError about tokenizer.json)."""
    corpus = write_corpus(tmp_path / "c", 8)
    run = tmp_path / "run"
    b = prepare_data(corpus, run, seq_len=16, vocab_size=300, log_fn=lambda m: None)
    path, content = {"meta_not_json": ("data/meta.json", "{corrupt"), "streams_missing": ("data/streams.npz", None),
                     "streams_junk": ("data/streams.npz", "junk"), "tokenizer_junk": ("tokenizer.json", "junk")}[damage]
    if content is None:
        (run / path).unlink()
    else:
        (run / path).write_text(content)
    msgs = []
    b2 = prepare_data(corpus, run, seq_len=16, vocab_size=300, log_fn=msgs.append)
    assert np.array_equal(b2.train.stream, b.train.stream)
    if damage != "meta_not_json":  # (an unparsable meta.json is just "no cache")
        assert any("unreadable" in m and "preparing again" in m for m in msgs), msgs
    msgs.clear()
    prepare_data(corpus, run, seq_len=16, vocab_size=300, log_fn=msgs.append)
    assert any("reusing" in m for m in msgs)


def test_packed_batch_and_sampler_state_checked():
    """Out-of-range row indices and an empty batch: a clear error (numpy's "could not broadcast" / "need at least
    one array" before; -1 is not "the last row"); a sampler state whose cursor is past the end gave silently
    wrong batches."""
    ds = PackedDataset(*pack_documents([[1, 2, 3], [4, 5, 6, 7]], 0), seq_len=4)
    assert len(ds) == 2 and ds.batch([np.int64(1)])["input_ids"].shape == (1, 4)
    for bad in ([2], [-1], [0, 5]):
        with pytest.raises(IndexError, match="out of range for 2 rows"):
            ds.batch(bad)
    with pytest.raises(ValueError, match="at least one row"):
        ds.batch([])
    s = ResumableSampler(4, 2)
    for sd in ({"num_items": 4, "epoch": 0, "cursor": 9, "seed": 0}, {"num_items": 4, "epoch": -1, "cursor": 0, "seed": 0}):
        with pytest.raises(ValueError, match="out of range"):
            s.load_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        s.load_state_dict({})


# ---- scale: what a corpus far larger than the default meets ----
def test_scrub_is_linear_on_long_hyphen_runs():
    """The secret-name and URL-scheme patterns retried every hyphen of a long [\\w-] run: quadratic, 249 s for an
    80 KB "a-a-a-..." (slugs, UUID lists). A subprocess with a 60 s limit (~0.05 s now) guards it; the secrets
    around such runs are still found."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import thrifty
    code = ("from thrifty.data.preprocess import scrub\n"
            "for s in ('a-' * 40000, 'token-' * 20000, 'x.' * 40000, 'a+' * 40000):\n"
            "    assert scrub(s)[0] == s\n")
    env = {**os.environ, "PYTHONPATH": str(Path(thrifty.__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env)
    text = "a-" * 5000 + ' my-api_key = "sk9f8a7s6d5f4g3h2" and postgres://app:hunter2@db/x\nexport GITHUB_TOKEN=abc123def456'
    out, counts = scrub(text)
    assert counts["secret"] == 3 and "hunter2" not in out and "sk9f8" not in out and "abc123" not in out


def test_prepare_data_at_scale(tmp_path, monkeypatch):
    """A document past SPLIT_DOC_CHARS is read as parts cut at line breaks (the filters, shingling and the
    tokenizer held ~30x a 300 MB record); texts are encoded a chunk at a time into int32 arrays with the same ids
    as one encode; long stages say how far they are; the cache is shared by every spelling of the corpus path
    and refuses streams encoded with another tokenizer.json (a preparation killed between the two writes)."""
    import importlib
    import os
    pipe = importlib.import_module("thrifty.data.pipeline")
    pre = importlib.import_module("thrifty.data.preprocess")  # the package's name 'preprocess' is the function
    monkeypatch.setattr(pipe, "SPLIT_DOC_CHARS", 4000)
    monkeypatch.setattr(pipe, "SPLIT_PART_CHARS", 1000)
    monkeypatch.setattr(pre, "PROGRESS_SECONDS", 0.0)
    corpus = tmp_path / "c"
    corpus.mkdir()
    big = "\n".join(prose(i, 40) for i in range(40))
    (corpus / "big.txt").write_text(big)
    (corpus / "small.txt").write_text(prose(99))
    msgs = []
    b = prepare_data(corpus, tmp_path / "run", seq_len=16, vocab_size=300, log_fn=msgs.append)
    parts = next(m for m in msgs if "big.txt" in m)
    n_parts = int(parts.split("read as ")[1].split()[0])
    assert len(big) // 1000 <= n_parts <= len(big) // 500 and "cut at line breaks" in parts
    assert b.stats["documents_in"] == n_parts + 1
    for stage in ("quality filters", "near-dup", "privacy scrub", "tokenize"):
        assert any(m.startswith(f"{stage}: 0 / ") for m in msgs), (stage, msgs)
    texts = [prose(i, 30) for i in range(5)]
    assert [a.tolist() for a in pipe._encode(b.tokenizer, texts, lambda m: None, chunk=2)] == \
        [b.tokenizer.encode(t).ids for t in texts]
    # another spelling of the same corpus: a cache hit
    msgs = []
    monkeypatch.chdir(tmp_path)
    b2 = prepare_data(os.path.join(".", "c", "..", "c"), tmp_path / "run", seq_len=16, vocab_size=300,
                      log_fn=msgs.append)
    assert any("reusing the tokenized cache" in m for m in msgs) and np.array_equal(b2.train.stream, b.train.stream)
    # tokenizer.json replaced by another preparation that stopped before its streams and meta: prepared again
    tok = tmp_path / "run" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|pad|>"', '"<|padding|>"'))
    msgs = []
    b3 = prepare_data(corpus, tmp_path / "run", seq_len=16, vocab_size=300, log_fn=msgs.append)
    assert any("another tokenizer.json" in m for m in msgs) and np.array_equal(b3.train.stream, b.train.stream)


def test_one_huge_document_is_held_out_by_its_tail(tmp_path, monkeypatch):
    """A lone document read as parts (past SPLIT_DOC_CHARS) is held out by its last val_fraction of characters, as
    a lone document is; the parts were hashed instead (12% held out for 5%), and a short last part was dropped as
    too short."""
    import importlib
    pipe = importlib.import_module("thrifty.data.pipeline")
    monkeypatch.setattr(pipe, "SPLIT_DOC_CHARS", 4000)
    monkeypatch.setattr(pipe, "SPLIT_PART_CHARS", 1000)
    for text in ("\n".join(prose(i, 40) for i in range(40)), " ".join(prose(i, 40) for i in range(40))):
        (tmp_path / "one.txt").write_text(text)
        msgs = []
        b = prepare_data(tmp_path / "one.txt", tmp_path / f"run{len(text)}", seq_len=16, vocab_size=300,
                         near_dup=False, log_fn=msgs.append)
        held = next(m for m in msgs if m.startswith("data: one document: its last"))
        share = float(held.split("(")[1].split("%")[0])
        assert 4.0 <= share <= 6.0, held
        assert b.stats["quality_dropped"] == {}
