"""`thrifty quantize` on bad input: one line on stderr, exit code 2, and OUT_DIR untouched (absent when it
did not exist, unchanged when it did). Micro models, RTN, CPU only, a few seconds in all."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import thrifty
import thrifty.cli
from thrifty.models import Llama, LlamaConfig

THRIFTY_PATH = str(Path(thrifty.__file__).resolve().parents[1])
MICRO = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
RTN = ["--bits", "4", "--group-size", "32"]


@pytest.fixture
def src(tmp_path) -> Path:
    torch.manual_seed(0)
    d = tmp_path / "src"
    Llama(LlamaConfig(**MICRO)).init_weights().save_pretrained(d)
    (d / "tokenizer.json").write_text("{}")  # only copied by --method rtn
    return d


def _snapshot(d: Path) -> dict:
    """Every path under d with its bytes (None for directories)."""
    return {str(p.relative_to(d)): (None if p.is_dir() else p.read_bytes()) for p in sorted(d.rglob("*"))}


def _quantize(*argv) -> int:
    return thrifty.cli.main(["quantize", *map(str, argv)])


def _assert_user_error(capsys, rc, *words):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, captured
    assert err.startswith("thrifty quantize: error: ") and "\n" not in err, err
    assert "Traceback" not in captured.err
    for w in words:
        assert w in err, err
    return captured


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(src, tmp_path, capsys, damage):
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file" * 4, "empty": b""}[damage])
    before = _snapshot(tmp_path)
    _assert_user_error(capsys, _quantize(src, tmp_path / "q", *RTN), "corrupt or truncated", "model.safetensors")
    assert _snapshot(tmp_path) == before  # no OUT_DIR, no temporary directory left behind


def test_corrupt_safetensors_as_a_command(src, tmp_path):
    # the real process: exit status 2 and one line, no traceback
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    env = {**os.environ, "PYTHONPATH": THRIFTY_PATH + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "thrifty", "quantize", str(src), str(tmp_path / "q"), *RTN],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("thrifty quantize: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
@pytest.mark.parametrize("existing", [False, True])
def test_invalid_config_json_writes_nothing(src, tmp_path, capsys, text, existing):
    # config.json used to be parsed after model.safetensors was written into OUT_DIR
    (src / "config.json").write_bytes(text.encode("latin-1"))
    out = tmp_path / "q"
    if existing:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"an older model")
    before = _snapshot(tmp_path)
    _assert_user_error(capsys, _quantize(src, out, *RTN), "config.json")
    assert _snapshot(tmp_path) == before


def test_invalid_index_json(src, tmp_path, capsys):
    # a sharded folder's index (next to a model.safetensors it is ignored, as by the loaders)
    (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    (src / "model.safetensors.index.json").write_text('{"metadata": {}}')
    _assert_user_error(capsys, _quantize(src, tmp_path / "q", *RTN), "weight_map")
    assert not (tmp_path / "q").exists()


def test_out_dir_is_a_file_refused_before_the_work(src, tmp_path, capsys):
    out = tmp_path / "q"
    out.write_text("keep me")
    captured = _assert_user_error(capsys, _quantize(src, out, *RTN), "not a directory")
    assert "weight rel. error" not in captured.out  # refused before quantizing anything
    assert out.read_text() == "keep me"
    # a path below a file too
    _assert_user_error(capsys, _quantize(src, out / "sub", *RTN), "not a directory")


@pytest.mark.parametrize("how", ["same", "dot", "symlink"])
def test_out_dir_same_as_model_dir_refused(src, tmp_path, capsys, how):
    # used to overwrite the float model.safetensors in place, then die with shutil.SameFileError
    out = {"same": src, "dot": src / ".." / "src" / "."}.get(how)
    if how == "symlink":
        out = tmp_path / "link"
        out.symlink_to(src, target_is_directory=True)
    before = _snapshot(src)
    captured = _assert_user_error(capsys, _quantize(src, out, *RTN), "MODEL_DIR")
    assert "weight rel. error" not in captured.out
    assert _snapshot(src) == before


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_bad_calibration_file_exits_2(src, tmp_path, capsys, content):
    cal = tmp_path / "cal.txt"
    if content is not None:
        cal.write_text(content)
    rc = _quantize(src, tmp_path / "q", *RTN, "--method", "gptq", "--calibration", cal)
    _assert_user_error(capsys, rc, "--calibration", "empty" if content is not None else "no such file")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_out_dir_as_it_was(src, tmp_path, capsys, monkeypatch, existing):
    # a failure after model.safetensors is written (here: copying the tokenizer) used to leave it there
    out = tmp_path / "q"
    if existing:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"an older model")
        (out / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)

    def no_space(*a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("shutil.copy", no_space)
    _assert_user_error(capsys, _quantize(src, out, *RTN), "No space left on device")
    assert _snapshot(tmp_path) == before


def test_parents_made_for_a_failed_write_are_removed(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("shutil.copy", lambda *a, **kw: (_ for _ in ()).throw(OSError(28, "No space left")))
    before = _snapshot(tmp_path)
    _assert_user_error(capsys, _quantize(src, tmp_path / "a" / "b" / "q", *RTN), "No space left")
    assert _snapshot(tmp_path) == before


def test_writes_into_new_nested_and_existing_out_dirs(src, tmp_path, capsys):
    from safetensors.torch import load_file

    assert _quantize(src, tmp_path / "a" / "b" / "q", *RTN) == 0
    new = tmp_path / "a" / "b" / "q"
    assert sorted(p.name for p in new.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    out = tmp_path / "q"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an older model")
    (out / "notes.txt").write_text("mine")
    assert _quantize(src, out, *RTN) == 0
    # the new files replace the old ones, other files stay, no temporary directory is left
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt", "tokenizer.json"]
    got, want = load_file(str(out / "model.safetensors")), load_file(str(new / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.qweight" in got
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "q", "src"]
    loaded = Llama.from_pretrained(out)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, thrifty.nn.QuantLinear)


@pytest.mark.parametrize("flags, noted", [
    (["--bits", "8", "--group-size", "64"], ["--group-size 64 with --bits 8"]),
    (RTN + ["--damp", "0.1", "--no-act-order"], ["--damp with --method rtn", "--no-act-order with --method rtn"]),
    (RTN + ["--seq-len", "64", "--calibration-tokens", "100"], ["--seq-len with", "--calibration-tokens with"]),
    (RTN, []),
])
def test_flags_without_effect_are_noted(src, tmp_path, capsys, flags, noted):
    """A flag given a value it does not act on (W8 has no groups; RTN reads no calibration) runs, with a note
    naming it on stderr (it was accepted silently)."""
    assert _quantize(src, tmp_path / "q", *flags) == 0
    err = capsys.readouterr().err
    for n in noted:
        assert n in err and "has no effect here" in err, err
    assert err.count("has no effect here") == len(noted)


def test_reads_the_files_the_loaders_read_and_clears_stale_weights(src, tmp_path, capsys):
    """transformers saving unsharded over a sharded folder leaves a stale index.json whose shards are gone: the
    loaders read model.safetensors first, the CLI read the index (refused the folder, or quantized stale shards
    still on disk). Quantizing into a folder holding an earlier sharded save left its index and shards next to
    the new model.safetensors (and a later `thrifty quantize` of it read them as a float model)."""
    import json
    from safetensors.torch import load_file
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    out = tmp_path / "q"
    Llama.from_pretrained(src).save_pretrained(out, max_shard_size="20KB")  # an earlier, sharded save in OUT_DIR
    assert (out / "model.safetensors.index.json").exists()
    assert _quantize(src, out, *RTN) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert "model.layers.0.mlp.down_proj.qweight" in load_file(str(out / "model.safetensors"))
    assert "note:" not in capsys.readouterr().err  # a Llama: no "cannot load this architecture"
    # ... and the quantized folder is refused by name, not as "no *_proj.weight matrices"
    _assert_user_error(capsys, _quantize(out, tmp_path / "q2", *RTN), "quantized already", "bits=4",
                       "group_size=32")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    _assert_user_error(capsys, _quantize(src, tmp_path / "q3", *RTN), "quantized already", "'gptq'", "from_gptq")


def test_gptq_tokenizer_beyond_the_vocab_and_unknown_architecture(src, tmp_path, capsys):
    """A tokenizer whose ids pass the model's vocab (issue 7's "a tokenizer that does not match the model's
    vocab") and an architecture neither thrifty nor transformers runs: one line and exit 2, not tracebacks.
    With --method rtn such a folder quantizes, with a note that thrifty's loaders will not read OUT_DIR."""
    import json
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 50] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(src / "tokenizer.json"))  # ids up to ~290 against vocab_size 128
    gptq = ["--bits", "4", "--group-size", "32", "--method", "gptq", "--calibration-tokens", "64", "--seq-len", "32"]
    _assert_user_error(capsys, _quantize(src, tmp_path / "q", *gptq), "does not match the model", "vocab_size is 128")
    (src / "tokenizer.json").unlink()
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "weirdlm"
    (src / "config.json").write_text(json.dumps(cfg))
    _assert_user_error(capsys, _quantize(src, tmp_path / "q", *gptq), "weirdlm", "--method rtn")
    assert not (tmp_path / "q").exists()
    assert _quantize(src, tmp_path / "q", *RTN) == 0
    assert "cannot load this architecture" in capsys.readouterr().err
