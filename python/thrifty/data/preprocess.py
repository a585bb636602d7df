"""Preprocessing: quality filters, exact and near-duplicate removal, privacy scrubbing.

Each step logs how many documents it saw, kept and dropped (and why); :func:`preprocess` returns
the cleaned texts and a stats dict with those counts.
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import math
import string
import time
import unicodedata
import zlib
from dataclasses import dataclass

from thrifty.data.sources import Document

log = logging.getLogger("thrifty.data")


@dataclass
class FilterConfig:
    min_chars: int = 64            # shorter documents are dropped ("too_short")
    min_text_ratio: float = 0.80   # share of letters/digits/whitespace/punctuation ("mostly_non_text")
    max_mean_line_len: int = 1000  # longer lines that do not read as prose: minified code, base64 ("mostly_non_text")
    # share of the characters of non-empty lines (3 or more) in lines that repeat an earlier one ("repetitive");
    # by characters, so the short lines code and markup repeat by nature (}, """, */, ```) weigh little
    max_dup_line_frac: float = 0.5
    min_compress_ratio: float = 0.10  # zlib size / size below this is "repetitive" (documents of 128+ bytes)
    near_dup_threshold: float = 0.8  # MinHash LSH Jaccard threshold
    num_perm: int = 128            # MinHash permutations: the Jaccard estimate's error is ~0.035 at 0.8
    shingle_words: int = 5
    max_shingles: int = 4000

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the field when a threshold is out of range (a filter that would keep or drop
        everything, or that datasketch rejects with an obscure message)."""
        for name, (lo, hi, what, integer, lo_open, hi_open) in _FIELD_RANGES.items():
            _check_number(f"FilterConfig.{name}", getattr(self, name), lo, hi, what, integer, lo_open, hi_open)


# field: (low, high or None, what is expected, integer, low excluded, high excluded)
_FIELD_RANGES = {
    "min_chars": (0, None, "a number of characters >= 0", True, False, False),
    "min_text_ratio": (0, 1, "a fraction in [0, 1]", False, False, False),
    "max_mean_line_len": (1, None, "a number of characters >= 1", True, False, False),
    "max_dup_line_frac": (0, 1, "a fraction in [0, 1]", False, False, False),
    "min_compress_ratio": (0, 1, "a fraction in [0, 1]", False, False, False),
    "near_dup_threshold": (0, 1, "a Jaccard similarity strictly between 0 and 1", False, True, True),
    "num_perm": (2, None, "a number of permutations >= 2", True, False, False),
    "shingle_words": (1, None, "a number of words >= 1", True, False, False),
    "max_shingles": (1, None, "a number of shingles >= 1", True, False, False),
}


def _check_number(label, v, lo, hi, what, integer=False, lo_open=False, hi_open=False) -> None:
    ok = not isinstance(v, bool) and (isinstance(v, int) if integer else
                                      isinstance(v, (int, float)) and math.isfinite(v))
    if ok:
        ok = (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        raise ValueError(f"{label}: expected {what}, got {v!r}")


# long-line documents whose whitespace-separated words are longer than this on average are not prose. Not a
# FilterConfig field: that would change the data-cache fingerprint of existing runs, which a --resume needs
MAX_MEAN_WORD_LEN = 12
_TEXTLIKE = set(string.ascii_letters + string.digits + string.whitespace + string.punctuation)
# lone UTF-16 surrogates: what a JSON "\ud800" escape decodes to; not text, and no UTF-8 encoder takes them
_SURROGATE = re.compile("[\ud800-\udfff]")


def _is_mark(c: str) -> bool:
    """A combining mark (Unicode category M): the vowel signs and viramas of Indic scripts, Thai vowels and
    tones, Arabic and Hebrew diacritics, the accents of decomposed (NFD) Latin text. Part of a letter, not noise."""
    return unicodedata.category(c)[0] == "M"


MAX_MARKS_PER_LETTER = 3  # Indic, Thai, Arabic, NFD Vietnamese stack at most 2-3; "Zalgo" text stacks many


def _text_like_count(text: str) -> int:
    """Letters, digits, whitespace, punctuation, and the combining marks on a letter (up to
    MAX_MARKS_PER_LETTER of them: marks alone, after digits or symbols, or stacked deeper are noise)."""
    ok, marks = 0, MAX_MARKS_PER_LETTER + 1  # marks since the last letter (over the cap: no letter before)
    for c in text:
        if c in _TEXTLIKE or c.isalnum() or c.isspace():
            ok += 1
            marks = 0 if c.isalpha() else MAX_MARKS_PER_LETTER + 1
        elif _is_mark(c):
            marks += 1
            ok += marks <= MAX_MARKS_PER_LETTER
        else:
            marks = MAX_MARKS_PER_LETTER + 1
    return ok


def _spaceless_script(word: str) -> bool:
    """Mostly letters of scripts written without spaces (Thai, CJK, ...: code points from U+0E00)."""
    return sum(1 for c in word if (c.isalpha() or _is_mark(c)) and ord(c) >= 0x0E00) > len(word) / 2


def _reads_as_prose(text: str) -> bool:
    """Word-sized runs between spaces and mostly letters: prose (prose in scripts without spaces too), not
    minified code (`a.b=function(c){return`), base64/hex (one run) or a number dump (few letters)."""
    words = [w for w in text.split() if not _spaceless_script(w)]
    n = sum(len(w) for w in words)
    letters = sum(1 for c in text if c.isalpha() or (ord(c) >= 0x300 and _is_mark(c)))
    return (not words or n / len(words) <= MAX_MEAN_WORD_LEN) and letters >= len("".join(text.split())) / 2


# a base64 / hex run (hex is a subset): 24+ characters of the alphabet with letters and digits both, which
# camelCase identifiers (no digits) and numbers (no letters) are not
_BLOB_RUN = re.compile(r"(?=[A-Za-z0-9+/]*[0-9])(?=[A-Za-z0-9+/]*[A-Za-z])[A-Za-z0-9+/]{24,}={0,2}")
MAX_BLOB_SHARE = 0.5  # documents whose non-space characters are mostly such runs are data, not text


def _blob_share(text: str) -> float:
    """Share of the non-space characters in whitespace-separated runs that are base64 / hex blobs (also when
    wrapped in 64- or 76-character lines, as PEM and MIME do)."""
    runs = text.split()
    total = sum(len(r) for r in runs)
    return sum(len(r) for r in runs if _BLOB_RUN.fullmatch(r)) / total if total else 0.0


MIN_ALNUM_SHARE = 0.25  # letters (with their marks) and digits, of the non-space characters; code has over 0.5


def _alnum_count(s: str) -> int:
    return sum(1 for c in s if c.isalnum() or _is_mark(c))


def _dup_line_char_share(lines: list[str]) -> float:
    """Share of the characters of ``lines`` in lines that repeat an earlier one."""
    seen, dup = set(), 0
    for ln in lines:
        if ln in seen:
            dup += len(ln)
        else:
            seen.add(ln)
    return dup / sum(len(ln) for ln in lines)


def quality_reason(text: str, cfg: FilterConfig = FilterConfig()) -> str | None:
    """Why ``text`` fails the quality filters (a short reason), or None when it passes.

    Reasons: ``binary_or_non_utf8`` (lone surrogates, as a JSON ``\\ud800`` escape gives: no UTF-8 text),
    ``too_short``, ``mostly_non_text`` (letters, combining marks, digits, whitespace and punctuation under
    ``min_text_ratio``; letters and digits under MIN_ALNUM_SHARE of the non-space characters; or long lines /
    base64-hex runs that are data), ``repetitive`` (see FilterConfig's max_dup_line_frac and
    min_compress_ratio)."""
    if _SURROGATE.search(text):
        return "binary_or_non_utf8"
    stripped = text.strip()
    if len(stripped) < cfg.min_chars:
        return "too_short"
    ok = _text_like_count(stripped)
    if ok < cfg.min_text_ratio * len(stripped):
        return "mostly_non_text"
    nonspace = "".join(stripped.split())
    if _alnum_count(nonspace) < MIN_ALNUM_SHARE * len(nonspace):  # all punctuation / symbols: rulers, spam
        return "mostly_non_text"
    lines = [ln.strip() for ln in stripped.splitlines() if ln.strip()]
    # one long line is also what a paragraph (a .jsonl "text" field) looks like: only blobs that do not
    # read as prose (few word breaks, few letters) are dropped
    if lines and len(stripped) / len(lines) > cfg.max_mean_line_len and not _reads_as_prose(stripped):
        return "mostly_non_text"
    if _blob_share(stripped) > MAX_BLOB_SHARE:  # data blobs in short lines (base64 in MIME / PEM wrapping)
        return "mostly_non_text"
    if len(lines) >= 3 and _dup_line_char_share(lines) > cfg.max_dup_line_frac:
        return "repetitive"
    raw = stripped.encode("utf-8", "replace")
    # zlib's own overhead keeps the ratio of any short text high: only runs of repeats get under the cut
    if len(raw) >= 128 and len(zlib.compress(raw, 1)) / len(raw) < cfg.min_compress_ratio:
        return "repetitive"
    return None


PROGRESS_SECONDS = 30.0  # a long stage says how far it is this often (its counts come at its end)


def with_progress(items, say, stage: str, total: int | None = None, step: int = 1):
    """Yields ``items`` (a sequence, or ``total`` of them taken ``step`` documents at a time), logging
    "<stage>: done / total documents" every PROGRESS_SECONDS."""
    total = len(items) if total is None else total
    last = time.monotonic()
    for i, item in enumerate(items):
        now = time.monotonic()
        if now - last >= PROGRESS_SECONDS:
            last = now
            say(f"{stage}: {i * step} / {total} documents ...")
        yield item


def exact_dedup(texts: list[str]) -> tuple[list[str], int]:
    """Drops exact duplicates (SHA-256 of the whitespace-stripped text); keeps the first."""
    seen, out = set(), []
    for t in texts:
        h = hashlib.sha256(t.strip().encode("utf-8", "replace")).digest()
        if h not in seen:
            seen.add(h)
            out.append(t)
    return out, len(texts) - len(out)


def _shingles(text: str, k: int, cap: int) -> list[bytes]:
    words = text.split()
    if len(words) < k:
        return [" ".join(words).encode("utf-8", "replace")]
    sh = {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}
    return [s.encode("utf-8", "replace") for s in sorted(sh)[:cap]] if len(sh) > cap else [s.encode("utf-8", "replace") for s in sh]


def near_dedup(texts: list[str], threshold: float = 0.8, num_perm: int = 128, shingle_words: int = 5,
               max_shingles: int = 4000, seed: int = 1, log_fn=None) -> tuple[list[str], int]:
    """Drops near-duplicates with MinHash LSH (datasketch): a document whose estimated Jaccard
    similarity of word ``shingle_words``-grams with an earlier kept one reaches ``threshold``.

    The LSH bands are tuned for recall (datasketch's weights, false negatives 9x as costly as false
    positives) and each candidate it returns is then checked against the threshold with the MinHash
    estimate: LSH alone, banded for ``threshold``, kept about half the pairs at a true Jaccard of 0.83.
    The estimate's standard error is sqrt(J (1 - J) / num_perm): ~0.035 at 0.8 with 128 permutations.

    ``threshold`` must lie strictly between 0 and 1 (datasketch cannot band 1.0; exact copies are
    :func:`exact_dedup`'s), ``num_perm`` >= 2, ``shingle_words`` and ``max_shingles`` >= 1: ValueError otherwise."""
    for name, v in (("threshold", threshold), ("num_perm", num_perm), ("shingle_words", shingle_words),
                    ("max_shingles", max_shingles)):
        lo, hi, what, integer, lo_open, hi_open = _FIELD_RANGES["near_dup_threshold" if name == "threshold" else name]
        _check_number(f"near_dedup {name}", v, lo, hi, what, integer, lo_open, hi_open)
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError as err:
        raise ImportError("near-duplicate removal needs datasketch (pip install datasketch)") from err
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    kept = {}
    out = []
    for i, t in enumerate(with_progress(texts, log_fn or log.info, "near-dup")):
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch(_shingles(t, shingle_words, max_shingles))
        if any(kept[k].jaccard(m) >= threshold for k in lsh.query(m)):
            continue
        lsh.insert(str(i), m)
        kept[str(i)] = m
        out.append(t)
    return out, len(texts) - len(out)


# ---- privacy scrubbing ----
# the top-level domain ends the address: not glued to a '-' or a word character (a locale like
# sd_IN@devanagari.UTF-8 is no address)
EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# four dotted ASCII numbers that are not part of a longer dotted run (1.2.3.4.5, a.1.2.3.4) nor glued to a
# word (v10.0.0.1, x1.2.3.4); _ipv4 then decides (see scrub's docstring for the rule)
IPV4_RE = re.compile(r"(?<![\w.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![\w.]*[0-9])")
# the words right before a version number: "version 2.0.1.3", "Version: 4.3.2.1", "build 1.0.0.7", "rev. 3.2.1.0",
# a requirement pin (foo==1.2.3.4), and a name that is "version" assigned a quoted value: __version__ = "1.2.3.4",
# "version": "1.2.3.4", VERSION='1.2.3.4' (only "version" there: server_v = "10.0.0.1" is an address)
_VERSION_BEFORE_RE = re.compile(r"""(?i)(?:\b(?:v|ver|version|release|build|rev|revision|firmware)\.?\s*[:=#]?\s*"""
                                r"""|[=<>~!]=\s*|(?<![A-Za-z0-9])_*version_*["']?\s*[:=]\s*["'])$""")
IPV6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%\w+)?(?![\w:])")
SECRET_RES = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),              # AWS access key id (ASIA: temporary, from STS)
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),             # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{30,}\b"),
    re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}\b"),   # OpenAI / Anthropic style
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),           # Slack
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),                  # Google API key
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),                    # Hugging Face token
    re.compile(r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}\b"),    # Stripe secret / restricted keys
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # JWT (base64 of '{"' twice)
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"),                  # GitLab personal access token
    re.compile(r"\bnpm_[A-Za-z0-9]{36}\b"),                     # npm access token
    re.compile(r"\bpypi-AgE[A-Za-z0-9_-]{50,}"),                # PyPI API token (a macaroon: pypi-AgEIcHlwaS5vcmc...)
]
_SECRET_WORD = r"(?:api[_-]?key|secret|token|passwd|password|access[_-]?key)"
# A name holding a secret word: a whole run of word characters and hyphens, entered at its start only and taken
# whole without backtracking into it (a lookahead capture, Python < 3.11 has no possessive quantifier). The
# earlier [\w-]*word[\w-]* retried every hyphen of a run: quadratic, 249 s for an 80 KB "a-a-a-..." run.
_SECRET_NAME = rf"(?<![\w-])(?=[\w-]*?{_SECRET_WORD})(?=(?P<run>[\w-]+))(?P=run)"
# key = "value" (or JSON "key": "value") assignments whose name says secret and whose value looks like a key:
# a letter and a digit, none of the punctuation of code, patterns, URLs or format strings ([ ] ( ) { } , % : and
# no "//"). Not special tokens like "eos_token": "<|endoftext|>", nor tokenizer_class = "PreTrainedTokenizerFast",
# TOKEN_PATTERN = "[A-Za-z_]+[0-9]*", token_range = "%d,%d-%d,%d:" or a token URL.
ASSIGN_SECRET_RE = re.compile(
    rf"""(?i)(?P<name>{_SECRET_NAME})(?P<sep>["']?\s*[:=]\s*)(?P<q>["'])(?=[^"']*[0-9])(?=[^"']*[A-Za-z])"""
    rf"""(?![^"']*//)[^"'\s<>\[\](){{}},%:]{{12,}}(?P=q)""")
# KEY=value unquoted (shell, .env, YAML): only a long token mixing letters and digits with no identifier or
# call punctuation (_ . ( [), so code like `api_key = get_key()` or `password = None` stays
ASSIGN_BARE_SECRET_RE = re.compile(
    rf"""(?i)(?P<name>{_SECRET_NAME})(?P<sep>\s*[:=]\s*)(?=[A-Za-z+/=-]*\d)(?=[0-9+/=-]*[A-Za-z])"""
    rf"""[A-Za-z0-9+/=-]{{16,}}(?=[\s,;&)\]}}]|$)""")
# .env / shell lines NAME=value (export optional, no spaces around '=', the whole line): any 8+ characters
# with a letter and a digit, so values with _ # ! & count too (SECRET_KEY=django-insecure-9x_8#k2l!m3...);
# not a $VAR or ${VAR} reference, nor a call.
ENV_SECRET_RE = re.compile(
    rf"""(?im)^(?P<head>\s*(?:export\s+)?{_SECRET_NAME}=)(?![$'"{{])(?=\S*[0-9])(?=\S*[A-Za-z])(?!\S*\()"""
    rf"""\S{{8,}}(?=[ \t]*$)""")
# the password of a URL's user:password@ (postgresql://app:hunter2@db/x, https://user:token@host): before the
# e-mail pattern, which would otherwise take "password@host.tld" for an address and leave the rest. The scheme
# (its last 32 characters at most, anywhere in a word) is bounded: an unbounded one restarted at every hyphen or
# dot of a long run, quadratic.
URL_PASSWORD_RE = re.compile(r"""(?i)([a-z][a-z0-9+.-]{0,31}://[^\s:/@'"<>]+:)([^\s/@'"<>]+)(@)""")
# Authorization: Bearer <token> (a token with a digit: not "the bearer of ...")
BEARER_RE = re.compile(r"(?i)\b(bearer\s+)(?=[A-Za-z._~+/-]*\d)[A-Za-z0-9._~+/-]{16,}=*")

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP_ADDRESS>", "secret": "<SECRET>"}


def _ipv4(m: re.Match) -> str:
    s = m.group(0)
    try:
        ipaddress.IPv4Address(s)  # each octet 0-255, no leading zeros ("01.02.03.04" is not an address)
    except ValueError:
        return s
    if _VERSION_BEFORE_RE.search(m.string[max(0, m.start() - 24):m.start()]):
        return s
    return PLACEHOLDERS["ip"]


def _ipv6(m: re.Match) -> str:
    s = m.group(0)
    groups = [g for g in s.split("%")[0].split(":") if g]
    # Python slices like x[1::2] are valid IPv6 text: demand an address-looking shape.
    if len(groups) < 3 and not any(len(g) == 4 for g in groups):
        return s
    try:
        ipaddress.IPv6Address(s.split("%")[0])
    except ValueError:
        return s
    return PLACEHOLDERS["ip"]


def scrub(text: str) -> tuple[str, dict[str, int]]:
    """Replaces e-mail addresses, IPv4/IPv6 addresses and API-key-like secrets with placeholders
    (``<EMAIL>``, ``<IP_ADDRESS>``, ``<SECRET>``). Returns the text and counts per kind. Secrets: known
    key formats, long key-like values assigned to secret-named keys, bearer tokens and the password of a
    URL's ``user:password@``.

    IP addresses, private ranges included (a 192.168.x.x in a log still maps someone's network): an IPv4
    address is replaced when all of these hold:

    - it is four dotted decimal octets, each 0-255 with no leading zero (``01.2.3.4`` is no address);
    - it is not part of a longer dotted run (``1.2.3.4.5``, ``10.1.2.3.4``) and not glued to a word or a
      dot before it (``v10.0.0.1``, ``x1.2.3.4``, ``.1.2.3.4``);
    - it does not follow a version word (``version 2.0.1.3``, ``Version: 4.3.2.1``, ``build 1.0.0.7``,
      ``__version__ = "1.2.3.4"``, ``"version": "1.2.3.4"``) or a requirement pin (``foo==1.2.3.4``, ``>=``,
      ``~=``).

    A trailing port, CIDR suffix or sentence full stop does not stop a match (``203.0.114.7:8080.``).
    IPv6: a valid address with at least three groups or a full four-digit group (``::1`` and times
    like ``12:30:45`` stay).
    """
    counts = {"email": 0, "ip": 0, "secret": 0}
    for r in SECRET_RES:
        text, n = r.subn(PLACEHOLDERS["secret"], text)
        counts["secret"] += n
    text, n = ASSIGN_SECRET_RE.subn(lambda m: f"{m['name']}{m['sep']}{m['q']}{PLACEHOLDERS['secret']}{m['q']}", text)
    counts["secret"] += n
    text, n = ASSIGN_BARE_SECRET_RE.subn(lambda m: f"{m['name']}{m['sep']}{PLACEHOLDERS['secret']}", text)
    counts["secret"] += n
    text, n = ENV_SECRET_RE.subn(lambda m: f"{m['head']}{PLACEHOLDERS['secret']}", text)
    counts["secret"] += n
    text, n = BEARER_RE.subn(lambda m: f"{m.group(1)}{PLACEHOLDERS['secret']}", text)
    counts["secret"] += n
    text, n = URL_PASSWORD_RE.subn(lambda m: f"{m.group(1)}{PLACEHOLDERS['secret']}{m.group(3)}", text)
    counts["secret"] += n
    text, n = EMAIL_RE.subn(PLACEHOLDERS["email"], text)
    counts["email"] += n
    before = text
    text = IPV4_RE.sub(_ipv4, text)
    counts["ip"] += text.count(PLACEHOLDERS["ip"]) - before.count(PLACEHOLDERS["ip"])
    before = text
    if ":" in text:
        text = IPV6_RE.sub(_ipv6, text)
        counts["ip"] += text.count(PLACEHOLDERS["ip"]) - before.count(PLACEHOLDERS["ip"])
    return text, counts


def preprocess(docs: list[Document], cfg: FilterConfig | None = None, *, near_dup: bool = True,
               scrub_pii: bool = True, log_fn=None) -> tuple[list[str], dict]:
    """Quality filters -> exact dedup -> near-dup removal -> scrubbing, with counts per step."""
    cfg = cfg or FilterConfig()
    cfg.validate()  # fields set after construction too
    say = log_fn or log.info
    stats: dict = {"documents_in": len(docs)}
    rejected: dict[str, int] = {}
    texts = []
    for d in with_progress(docs, say, "quality filters"):
        reason = d.rejected or (quality_reason(d.text, cfg) if d.text is not None else "binary_or_non_utf8")
        if reason:
            rejected[reason] = rejected.get(reason, 0) + 1
        else:
            texts.append(d.text)
    stats["quality_dropped"] = rejected
    say(f"quality filters: {len(docs)} documents in, {len(texts)} kept, dropped "
        + (", ".join(f"{k}={v}" for k, v in sorted(rejected.items())) or "none"))
    texts, n = exact_dedup(texts)
    stats["exact_duplicates"] = n
    say(f"exact dedup: {n} duplicates removed, {len(texts)} left")
    if near_dup and len(texts) > 1:
        texts, n = near_dedup(texts, cfg.near_dup_threshold, cfg.num_perm, cfg.shingle_words, cfg.max_shingles,
                              log_fn=say)
    else:
        n = 0
    stats["near_duplicates"] = n
    say(f"near-dup (MinHash LSH, Jaccard >= {cfg.near_dup_threshold}): {n} removed, {len(texts)} left")
    tot = {"email": 0, "ip": 0, "secret": 0}
    if scrub_pii:
        out = []
        for t in with_progress(texts, say, "privacy scrub"):
            t, c = scrub(t)
            for k in tot:
                tot[k] += c[k]
            out.append(t)
        texts = out
    stats["scrubbed"] = tot
    say(f"privacy scrub: {tot['email']} e-mails, {tot['ip']} IP addresses, {tot['secret']} secrets replaced")
    stats["documents_out"] = len(texts)
    stats["chars_out"] = sum(len(t) for t in texts)
    return texts, stats
