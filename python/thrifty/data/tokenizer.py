"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): trained on the corpus, or loaded from a
tokenizer.json (so any Hugging Face tokenizer works)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from thrifty.data.sources import replace_text

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
UNK_TOKEN = "<unk>"


def _tk():
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError("the tokenizer needs the `tokenizers` package (pip install tokenizers)") from err
    return tokenizers


# larger than any released BPE vocabulary (256k): `tokenizers` reserves tables of this size up front, and a
# typo like 10**12 aborted the whole process (a Rust allocation failure, no Python exception)
MAX_VOCAB_SIZE = 1 << 20


def check_vocab_size(vocab_size) -> None:
    """ValueError unless ``vocab_size`` is an int in [300, MAX_VOCAB_SIZE]."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size: expected at least 300 (256 bytes + merges + specials), got {vocab_size!r}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size: expected at most {MAX_VOCAB_SIZE} (2**20), got {vocab_size}")


def train_tokenizer(texts, vocab_size: int = 8192, min_frequency: int = 2):
    """Trains a byte-level BPE on ``texts`` (an iterable of str). ``<|endoftext|>`` is id 0 and
    ``<|pad|>`` id 1; every byte is in the alphabet, so any text encodes."""
    tk = _tk()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    tok = tk.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, directory: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Writes tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer reads.

    ``source``: the tokenizer.json (or its directory) ``tok`` was loaded from. When a tokenizer_config.json lies
    next to it (a Hugging Face model's: its bos/eos/unk/pad tokens, chat_template, add_bos_token, ...), that
    config is kept; the keys written here (the end-of-text token as eos, a begin-of-text token as bos, else the
    eos; <unk> and the pad token where the vocabulary has them) only fill what it lacks."""
    d = Path(directory)
    base = {}
    if source is not None:
        src = Path(source)
        src_cfg = (src if src.is_dir() else src.parent) / "tokenizer_config.json"
        if src_cfg.is_file():
            base = json.loads(src_cfg.read_text(encoding="utf-8"))  # read before anything in d is replaced
    d.mkdir(parents=True, exist_ok=True)
    path = d / "tokenizer.json"
    tmp = d / ".tokenizer.json.tmp"
    tok.save(str(tmp))
    os.replace(tmp, path)
    eos = eos_token(tok)
    bos = bos_token(tok) or eos
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30}
    if eos:
        cfg["eos_token"] = eos
    if bos:
        cfg["bos_token"] = bos
    if tok.token_to_id(UNK_TOKEN) is not None:
        cfg["unk_token"] = UNK_TOKEN
    if tok.token_to_id(PAD_TOKEN) is not None:
        cfg["pad_token"] = PAD_TOKEN
    cfg.update(base)
    replace_text(d / "tokenizer_config.json", json.dumps(cfg, indent=1))  # temp + rename, like tokenizer.json
    return path


def load_tokenizer(path: str | os.PathLike):
    """Loads a tokenizer.json (a file, or a directory holding one)."""
    tk = _tk()
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer: no tokenizer.json at {str(p)!r}")
    from thrifty.data.sources import DataError

    try:
        text = p.read_text(encoding="utf-8")
        json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"tokenizer: {str(p)!r} is not a tokenizer.json (not JSON: {e})") from None
    try:
        return tk.Tokenizer.from_str(text)
    except Exception as e:  # `tokenizers` raises a plain Exception for a malformed file: only that exact type
        if type(e) is not Exception:
            raise
        raise DataError(f"tokenizer: {str(p)!r} is not a valid tokenizer.json ({e})") from None


def eos_token(tok) -> str | None:
    for t in _EOS_CANDIDATES:
        if tok.token_to_id(t) is not None:
            return t
    return None


def bos_token(tok) -> str | None:
    """A begin-of-text token of the vocabulary (<|begin_of_text|>, <s>, ...), or None (GPT-2-style vocabularies,
    and the ones trained here, have none: their bos is the end-of-text token)."""
    for t in _BOS_CANDIDATES:
        if tok.token_to_id(t) is not None:
            return t
    return None


def bos_id(tok) -> int | None:
    t = bos_token(tok)
    return None if t is None else tok.token_to_id(t)


def eos_id(tok) -> int | None:
    t = eos_token(tok)
    return None if t is None else tok.token_to_id(t)


def vocab_size(tok) -> int:
    """Size of the id space (max id + 1, added tokens included)."""
    return tok.get_vocab_size(with_added_tokens=True)
