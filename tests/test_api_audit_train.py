"""Issue 7 (training) as an outside user drives it from the issue text: `thrifty train` flag combinations on micro
models, resume after a stop (same losses as an uninterrupted run) with every optimizer / precision / LoRA kind,
fine-tuning a transformers-saved directory, `thrifty generate` from a run and from a Hugging Face directory, and
bad input (a message naming the flag, exit 2, no traceback, nothing written). Micro models, CPU, a few seconds
each; the transformers parts skip without it."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thrifty.cli import main as cli_main
from thrifty.data import load_tokenizer, save_tokenizer, train_tokenizer
from thrifty.models import Llama, LlamaConfig
from thrifty.train import Trainer
from thrifty.train.run_dir import step_dirs

from test_data import prose
from test_api_issues_5_7 import base_model  # noqa: F401 (a fixture: the micro Llama in HF format)
from test_train import THRIFTY_PATH, _free_port, cfg, losses  # the same micro config, metrics reader, launcher bits

MICRO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(autouse=True)
def _one_thread():  # micro models: one thread avoids OpenMP barrier stalls on a shared box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        (d / f"doc{i:02d}.txt").write_text(prose(i, 200))
    save_tokenizer(train_tokenizer([prose(i, 200) for i in range(24)], vocab_size=320), d / "tok")
    return d


@pytest.fixture(scope="module")
def hf_dir(corpus, tmp_path_factory):
    """A micro LlamaForCausalLM (GQA, tied embeddings, bfloat16) and its tokenizer, both saved by transformers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
                                   initializer_range=0.3)  # varied greedy tokens (0.02: one token repeated)
    d = tmp_path_factory.mktemp("hf")
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tok" / "tokenizer.json"),
                                         eos_token="<|endoftext|>").save_pretrained(d)
    return d


def cli(*argv) -> tuple[int, str, str]:
    """`thrifty ARGV` in this process: (exit code, stdout, stderr). An exception escaping it is a traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def micro_cli(corpus, base_model, out, *extra):
    steps = () if "--time-budget" in extra else ("--steps", 2)
    return ("train", "--model", base_model, "--tokenizer", corpus / "tok" / "tokenizer.json", "--data", corpus,
            "--seq-len", 32, "--batch-size", 2, *steps, "--precision", "fp32", "--no-progress", "--out", out, *extra)


# ---------------- bad input: the message names the flag, exit 2, nothing written ----------------
@pytest.mark.parametrize("flags, named", [
    (("--lr", "-1"), "--lr"), (("--lr", "nan"), "--lr"), (("--weight-decay", "-0.5"), "--weight-decay"),
    (("--seed", "-1"), "--seed"), (("--time-budget", "0s"), "--time-budget"),
    (("--lora-rank", "4", "--lora-targets", "q_proj,v_porj"), "v_porj"),
    (("--lora-alpha", "16"), "--lora-alpha 16.0 (the adapters' scale) needs --lora-rank"),
])
def test_bad_flag_is_named_and_nothing_written(corpus, base_model, tmp_path, flags, named):
    """The optimizer's own "lr must be >= 0.0" / numpy's "Seed must be between 0 and 2**32 - 1" named no flag; a
    zero --time-budget trained a step; a misspelt --lora-targets entry was dropped silently when another matched."""
    out = tmp_path / "run"
    rc, _, err = cli(*micro_cli(corpus, base_model, out, *flags))
    assert rc == 2 and named in err and "Traceback" not in err, err[-2000:]
    assert "not allowed with" not in err  # the value is refused, not the flag combination
    assert not out.exists()


def test_python_api_checks_the_same_numbers(corpus, tmp_path):
    from thrifty.train import TrainError

    for kw, named in ((dict(lr=float("inf")), "--lr"), (dict(weight_decay=-1.0), "--weight-decay"),
                      (dict(seed=2**32), "--seed"), (dict(steps=None, time_budget=-5), "--time-budget")):
        with pytest.raises(TrainError, match=named):
            Trainer(cfg(corpus, tmp_path / "r", **kw)).train()
        assert not (tmp_path / "r").exists()


def test_apply_lora_names_a_target_that_matches_nothing():
    from thrifty.train.lora import apply_lora

    m = Llama(LlamaConfig(vocab_size=64, max_position_embeddings=32, **MICRO))
    with pytest.raises(ValueError, match=r"v_porj.*matches no nn.Linear"):
        apply_lora(m, 4, "q_proj,v_porj")
    assert len(apply_lora(m, 4, ("self_attn.q_proj", "v_proj"))) == 4  # dotted suffixes still match


# ---------------- resume ----------------
@pytest.mark.parametrize("kind", ["adamw8bit", "lion", "bf16_master", "bf16_no_master", "accum_checkpointing",
                                  "lora", "qlora"])
def test_resume_continues_the_same_losses(corpus, tmp_path, kind):
    kw = {"adamw8bit": dict(optimizer="adamw8bit"), "lion": dict(optimizer="lion"),
          "bf16_master": dict(precision="bf16"), "bf16_no_master": dict(precision="bf16", master_weights=False),
          "accum_checkpointing": dict(grad_accum=2, activation_checkpointing=True),
          "lora": dict(lora_rank=4, lora_targets="q_proj,v_proj,lm_head", lr=3e-2),
          "qlora": dict(lora_rank=4, lora_base_bits=4, lora_group_size=32, lr=3e-2,
                        model_overrides=dict(MICRO, hidden_size=64, intermediate_size=128))}[kind]
    a, b = tmp_path / "a", tmp_path / "b"
    Trainer(cfg(corpus, a, steps=6, save_every=3, **kw)).train()
    Trainer(cfg(corpus, b, steps=6, save_every=3, stop_at_step=3, **kw)).train()
    assert sorted(losses(b)) == [1, 2, 3]
    Trainer(cfg(corpus, b, steps=6, save_every=3, resume=True, **kw)).train()
    assert losses(b) == losses(a)
    from safetensors.torch import load_file
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_other_options_is_refused_by_flag(corpus, base_model, tmp_path, capsys):
    """--resume with an option the checkpoint's state depends on changed: exit 2 naming the flag, the run
    directory byte for byte as it was (adamw state went silently into Lion / the 8-bit optimizer; another
    --lora-rank or model shape raised KeyError / RuntimeError tracebacks); the same options still resume it."""
    from thrifty.train.cli import run

    ref, out, lo = tmp_path / "ref", tmp_path / "run", tmp_path / "lora"
    assert run(cfg(corpus, ref, steps=4, save_every=2)) == 0
    Trainer(cfg(corpus, out, steps=4, save_every=2, stop_at_step=2)).train()
    Trainer(cfg(corpus, lo, steps=4, save_every=2, stop_at_step=2, lora_rank=4, lora_targets=("q_proj",))).train()
    wide = dict(MICRO, hidden_size=64, intermediate_size=128)
    bigger = tmp_path / "bigger"
    Llama(LlamaConfig(vocab_size=320, max_position_embeddings=128, **wide)).save_pretrained(bigger)
    save_tokenizer(load_tokenizer(corpus / "tok"), bigger)
    capsys.readouterr()
    for d, kw, named in ((out, dict(optimizer="lion"), "--optimizer 'adamw'"),
                         (out, dict(optimizer="adamw8bit"), "--optimizer"),
                         (out, dict(lora_rank=4), "--lora-rank 0"),
                         (out, dict(model_overrides=wide), "model_overrides"),
                         (out, dict(model=str(bigger), model_overrides=None), "does not match the model"),
                         (lo, dict(lora_rank=8, lora_targets=("q_proj",)), "--lora-rank 4"),
                         (lo, dict(lora_rank=4, lora_targets=("q_proj", "v_proj")), "--lora-targets q_proj,")):
        before = tree(d)
        assert run(cfg(corpus, d, steps=4, save_every=2, resume=True, **kw)) == 2, kw
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, (kw, err)
        assert tree(d) == before, kw
    assert run(cfg(corpus, out, steps=4, save_every=2, resume=True)) == 0
    assert losses(out) == losses(ref)
    assert run(cfg(corpus, lo, steps=4, save_every=2, resume=True, lora_rank=4, lora_targets=("q_proj",))) == 0


# ---------------- fine-tuning a transformers directory, export, generate ----------------
@pytest.mark.parametrize("extra", [("--optimizer", "lion", "--grad-accum", "2", "--activation-checkpointing"),
                                   ("--lora-rank", "4", "--lora-targets", "q_proj,v_proj,o_proj"),
                                   ("--lora-rank", "4", "--qlora", "--lora-group-size", "32")])
def test_finetune_transformers_dir_export_loads_in_both(hf_dir, corpus, tmp_path, extra):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    rc, _, err = cli("train", "--model", hf_dir, "--data", corpus, "--seq-len", 32, "--batch-size", 2, "--steps", 3,
                     "--lr", "1e-2", "--no-progress", "--out", out, *extra)
    assert rc == 0, err[-3000:]
    conf = json.loads((out / "config.json").read_text())
    assert conf["tie_word_embeddings"] is True and conf["num_key_value_heads"] == 2
    x = torch.randint(0, 320, (2, 24))
    ours = Llama.from_pretrained(out, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    before = Llama.from_pretrained(hf_dir, dtype=torch.float32)
    # the logged size counts a QLoRA base's quantized weights (buffers, not parameters: it logged 0.02M of 0.09M)
    total, trainable = map(float, re.search(r"model: ([\d.]+)M parameters \(([\d.]+)M trainable", err).groups())
    assert abs(total - (before.num_params() / 1e6 + (trainable if "--lora-rank" in extra else 0))) < 0.011, err
    with torch.no_grad():
        lo, lt = ours(x), theirs(x).logits
        assert not torch.equal(lo, before(x))  # it trained
    torch.testing.assert_close(lo, lt, rtol=1e-4, atol=1e-4)
    rc, text, err = cli("generate", out, "--prompt", "alpha beta", "--max-new-tokens", 6, "--device", "cpu")
    assert rc == 0 and text.startswith("alpha beta"), err


def test_generate_hf_dir_matches_transformers_and_stops_at_every_eos(hf_dir, tmp_path):
    """`thrifty generate` on a transformers directory, greedy: the text of transformers' own greedy tokens; a
    generation_config.json listing several eos ids (Llama 3 Instruct's <|end_of_text|> and <|eot_id|>) ends
    the sample at any of them, as transformers' generate does (only the tokenizer's eos ended it)."""
    import shutil

    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(hf_dir)
    prompt = "alpha beta gamma"
    ids = tok.encode(prompt).ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        new = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()
    assert 0 not in new[:4]  # the micro model's greedy run does not hit its eos early
    first = next(i for i in range(2, len(new)) if new[i] not in new[:i])  # a token seen first at i >= 2
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    gen_args = ("--prompt", prompt, "--max-new-tokens", 10, "--temperature", 0, "--device", "cpu")
    cut = new[:new.index(0)] if 0 in new else new
    rc, text, err = cli("generate", d, *gen_args)
    assert rc == 0, err
    assert text.split("\n" + "-" * 40)[0] == prompt + tok.decode(cut)
    gc = json.loads((d / "generation_config.json").read_text())
    gc["eos_token_id"] = [0, new[first]]
    (d / "generation_config.json").write_text(json.dumps(gc))
    with torch.no_grad():
        stopped = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval().generate(
            torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert stopped == new[:first + 1]  # transformers stops at the listed id
    rc, text, err = cli("generate", d, *gen_args)
    assert rc == 0, err
    assert text.split("\n" + "-" * 40)[0] == prompt + tok.decode(new[:first])


def test_tokenizer_without_eos_leaves_the_config_without_one(corpus, tmp_path):
    """A --tokenizer with no end-of-text token: config.json says so (eos/bos None), instead of LlamaConfig's
    defaults 2 and 1, which named two ordinary BPE tokens (generation stopped at token 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([prose(i, 200) for i in range(24)], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tk.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "run"
    Trainer(cfg(corpus, out, tokenizer=str(tmp_path / "tokenizer.json"), steps=2)).train()
    conf = json.loads((out / "config.json").read_text())
    assert conf["eos_token_id"] is None and conf["bos_token_id"] is None
    m = Llama.from_pretrained(out)
    assert m.config.eos_ids == [] and m.generate(torch.tensor([[5, 6]]), max_new_tokens=12).shape == (1, 14)
    rc, text, err = cli("generate", out, "--max-new-tokens", 4, "--device", "cpu")  # empty prompt too
    assert rc == 0, err


def test_checkpoints_past_step_999999_are_ordered_by_step(corpus, tmp_path):
    """keep_last and --resume order step_<N> by N: step_1000000 sorts before step_999999 as text."""
    out = tmp_path / "run"
    Trainer(cfg(corpus, out, steps=2, save_every=1, keep_last=2)).train()
    ck = out / "checkpoints"
    state = torch.load(ck / "step_000002" / "trainer_state.pt", weights_only=False)
    state["step"] = 999_999  # as if the run had been long
    torch.save(state, ck / "step_000002" / "trainer_state.pt")
    (ck / "step_000002").rename(ck / "step_999999")
    Trainer(cfg(corpus, out, steps=1_000_001, save_every=1, keep_last=2, resume=True)).train()
    assert set(losses(out)) == {1, 2, 1_000_000, 1_000_001}
    # pruning kept the newest two (by name it would have deleted step_1000000 and kept step_999999)
    assert sorted(p.name for p in ck.iterdir()) == ["step_1000000", "step_1000001"]
    # and the latest checkpoint is found by number: resume picks step_1000001 over step_999999 and step_000010
    (ck / "step_999999").mkdir()
    (ck / "step_000010").mkdir()
    for d in ("step_999999", "step_000010"):
        (ck / d / "trainer_state.pt").write_bytes(b"")
    assert [p.name for p in step_dirs(ck, holding="trainer_state.pt")] == [
        "step_000010", "step_999999", "step_1000000", "step_1000001"]


def _torchrun(base_model, corpus, out, *flags, timeout=240):
    """`thrifty train` under torchrun, 2 processes (gloo on the CPU), on the micro model."""
    env = {**os.environ, "PYTHONPATH": THRIFTY_PATH + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(_free_port()), "-m", "thrifty.cli", "train", "--model", str(base_model), "--data",
                           str(corpus), "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2", "--warmup", "1",
                           "--no-progress", "--out", str(out), *flags], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_fsdp_bf16_under_a_time_budget(corpus, base_model, tmp_path):
    """--fsdp with bf16 runs autocast over float32 shards: the fused norms got a bf16 branch and a float32
    residual and refused them. And a --time-budget under torchrun hung at its end: each rank read its own clock,
    one saved and exported while the other stepped on."""
    out = tmp_path / "run"
    r = _torchrun(base_model, corpus, out, "--fsdp", "--precision", "bf16", "--time-budget", "6s", "--eval-every", "1000",
                  "--no-master-weights")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "autocast over fp32 params" in r.stderr and "FSDP2" in r.stderr
    assert "--no-master-weights has no effect there" in r.stderr  # said, not silently dropped
    assert "done:" in r.stderr and (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_fsdp_lora_resume_and_ddp_checkpoint_under_fsdp(corpus, base_model, tmp_path):
    """A LoRA run under --fsdp resumes (the adapters were copied as plain tensors into DTensor shards); a DDP
    checkpoint resumed with --fsdp is refused by name (it was a KeyError traceback)."""
    out = tmp_path / "lora"
    flags = ("--precision", "fp32", "--fsdp", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj", "--steps", "4",
             "--save-every", "2", "--keep-last", "5", "--eval-every", "100")
    r = _torchrun(base_model, corpus, out, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    full = losses(out)
    shutil.rmtree(out / "checkpoints" / "step_000004")
    r = _torchrun(base_model, corpus, out, *flags, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(out)[4] == full[4] and losses(out)[3] == full[3]
    ddp = tmp_path / "ddp"
    assert _torchrun(base_model, corpus, ddp, "--precision", "fp32", "--steps", "1").returncode == 0
    r = _torchrun(base_model, corpus, ddp, "--precision", "fp32", "--steps", "2", "--fsdp", "--resume")
    assert r.returncode != 0 and "was written without --fsdp" in r.stderr and "KeyError" not in r.stderr


def test_tokenizer_config_of_a_given_tokenizer_is_kept(corpus, tmp_path):
    """save_tokenizer wrote bos = eos and dropped the source's tokenizer_config.json (chat_template, unk,
    add_bos_token): a fine-tuned model's export lost them, and AutoTokenizer named the wrong bos."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.train_from_iterator([prose(i) for i in range(8)], tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    plain = tmp_path / "plain"
    save_tokenizer(tok, plain)
    tcfg = json.loads((plain / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["unk_token"]) == ("<s>", "</s>", "<unk>")
    src = tmp_path / "src"
    save_tokenizer(tok, src)
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": "{{ messages }}"}))
    out = tmp_path / "out"
    save_tokenizer(load_tokenizer(src), out, source=src / "tokenizer.json")
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == "{{ messages }}" and tcfg["add_bos_token"] is True and tcfg["unk_token"] == "<unk>"
    # a model trained from scratch with it takes its <s> as bos (it took the eos)
    run = tmp_path / "run"
    Trainer(cfg(corpus, run, tokenizer=str(plain / "tokenizer.json"), steps=1)).train()
    model_cfg = json.loads((run / "config.json").read_text())
    assert (model_cfg["bos_token_id"], model_cfg["eos_token_id"]) == (tok.token_to_id("<s>"), tok.token_to_id("</s>"))


def test_finetune_export_keeps_the_models_tokenizer_config(hf_dir, corpus, tmp_path):
    base_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    base_cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    src = tmp_path / "base"
    src.mkdir()
    for f in hf_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps(base_cfg))
    out = tmp_path / "run"
    rc, _, err = cli("train", "--model", src, "--data", corpus, "--seq-len", 32, "--batch-size", 2, "--steps", 1,
                     "--precision", "fp32", "--no-progress", "--out", out)
    assert rc == 0, err[-2000:]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == base_cfg["chat_template"]


def test_out_is_checked_before_anything_runs(corpus, base_model, tmp_path):
    """--out a file failed after the whole data pipeline with "[Errno 20] Not a directory: .../data"; --out inside
    --data wrote the run (metrics.jsonl included) into the corpus it would read next time."""
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    rc, _, err = cli(*micro_cli(corpus, base_model, afile))
    assert rc == 2 and "--out" in err and "is not a directory" in err and "Errno" not in err, err[-2000:]
    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        (data / f"d{i:02d}.txt").write_text(prose(i, 200))
    before = tree(data)
    for out in (data, data / "run"):
        rc, _, err = cli("train", "--model", base_model, "--tokenizer", corpus / "tok" / "tokenizer.json", "--data", data,
                         "--seq-len", 32, "--batch-size", 2, "--steps", 1, "--precision", "fp32", "--no-progress",
                         "--out", out)
        assert rc == 2 and "inside the --data directory" in err, err[-2000:]
    assert tree(data) == before


def test_demo_keeps_checkpoints_when_its_options_are_refused(tmp_path):
    out = tmp_path / "demo"
    (out / "checkpoints" / "step_000001").mkdir(parents=True)
    (out / "checkpoints" / "step_000001" / "trainer_state.pt").write_bytes(b"state")
    rc, _, err = cli("demo", "--out", out, "--time-budget", "0s")
    assert rc == 2 and "--time-budget" in err
    assert (out / "checkpoints" / "step_000001" / "trainer_state.pt").read_bytes() == b"state"


@pytest.mark.parametrize("flags, named", [(("--seed", "99999999999999999999"), "--seed"), (("--seed", "-1"), "--seed"),
                                          (("--temperature", "inf"), "--temperature")])
def test_generate_refuses_seed_and_temperature_by_flag(hf_dir, flags, named):
    rc, _, err = cli("generate", hf_dir, "--prompt", "the", *flags)
    assert rc == 2 and named in err and "Overflow" not in err, err[-2000:]


# ---------------- damaged run directories, a skipped last step, a stale export ----------------
def test_damaged_trainer_state_or_metrics_line_at_resume(corpus, tmp_path):
    """A truncated trainer_state.pt was a PytorchStreamReader traceback (exit 1) where a truncated
    model.safetensors is a clean error; a cut-short last metrics.jsonl line (power loss, full disk) was a
    JSONDecodeError traceback. Now: the first names the file and the way out, the second is dropped."""
    from thrifty.train import TrainError
    from thrifty.train.cli import run
    out, ref = tmp_path / "run", tmp_path / "ref"
    Trainer(cfg(corpus, ref, steps=6, save_every=2)).train()
    Trainer(cfg(corpus, out, steps=6, save_every=2, stop_at_step=4)).train()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 4.0')
    state = out / "checkpoints" / "step_000004" / "trainer_state.pt"
    good = state.read_bytes()
    state.write_bytes(good[:1000])
    with pytest.raises(TrainError, match=r"step_000004: corrupt or truncated trainer_state.pt .*remove .*step_000004"):
        Trainer(cfg(corpus, out, steps=6, save_every=2, resume=True)).train()
    state.write_bytes(good)
    assert run(cfg(corpus, out, steps=6, save_every=2, resume=True)) == 0
    assert losses(out) == losses(ref)


def test_a_skipped_last_step_still_checkpoints_and_resumes(corpus, tmp_path):
    """A non-finite loss on the last step is skipped (the weights stay the last good step's), yet no checkpoint
    was written at all: the run said "checkpoints in ..." and --resume then found none."""
    out = tmp_path / "run"
    res = Trainer(cfg(corpus, out, steps=4, inject_nan_steps=(4,))).train()
    assert res["nan_skipped"] == 1
    assert [d.name for d in step_dirs(out / "checkpoints")] == ["step_000004"]
    Trainer(cfg(corpus, out, steps=6, resume=True)).train()
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6] and got[4] is None  # the skipped step's loss is logged as null
    assert all(got[s] is not None for s in (1, 2, 3, 5, 6))


def test_a_kill_between_the_last_checkpoint_and_the_export_is_finished_by_resume(corpus, tmp_path):
    """A finished 4-step run extended with --steps 6 and killed after its step-6 checkpoint, before the export:
    --resume said "nothing to do" and kept the step-4 model.safetensors and summary.json for good."""
    out, ext = tmp_path / "run", tmp_path / "ext"
    Trainer(cfg(corpus, out, steps=4, save_every=2)).train()
    shutil.copytree(out, ext)
    Trainer(cfg(corpus, ext, steps=6, save_every=2, resume=True)).train()
    # what the kill leaves: the extension's checkpoints and metrics beside the 4-step export
    shutil.rmtree(out / "checkpoints")
    shutil.copytree(ext / "checkpoints", out / "checkpoints")
    shutil.copy(ext / "metrics.jsonl", out / "metrics.jsonl")
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    res = Trainer(cfg(corpus, out, steps=6, save_every=2, resume=True)).train()
    assert res["steps"] == 6 and json.loads((out / "summary.json").read_text())["steps"] == 6
    assert (out / "model.safetensors").read_bytes() == (ext / "model.safetensors").read_bytes()


def test_resume_without_data_or_tokenizer_uses_the_runs_own(corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    Trainer(cfg(corpus, a, steps=4, save_every=2)).train()
    Trainer(cfg(corpus, b, steps=4, save_every=2, stop_at_step=2)).train()
    t = Trainer(cfg(corpus, b, steps=4, save_every=2, resume=True, data=None, tokenizer=None))
    t.train()
    assert t.cfg.data == str(corpus) and t.cfg.tokenizer == str(corpus / "tok" / "tokenizer.json")
    assert losses(b) == losses(a)
    moved = tmp_path / "elsewhere"  # the recorded path gone: a message that says to pass it
    shutil.copytree(corpus, moved)
    Trainer(cfg(moved, tmp_path / "c", steps=2, save_every=1, stop_at_step=1)).train()
    shutil.rmtree(moved)
    from thrifty.train.trainer import TrainError

    with pytest.raises(TrainError, match=r"was trained with --data .*elsewhere, which is not there now .*pass --data"):
        Trainer(cfg(corpus, tmp_path / "c", steps=2, save_every=1, resume=True, data=None)).train()


def test_resume_says_what_it_continues_differently(corpus, tmp_path, capsys):
    """--batch-size is per process: the same value on another number of processes (here: another value on one)
    changes the global batch, and a longer --steps keeps the checkpoint's schedule; both were silent."""
    out = tmp_path / "r"
    Trainer(cfg(corpus, out, steps=4, save_every=2, stop_at_step=2)).train()
    capsys.readouterr()
    Trainer(cfg(corpus, out, steps=6, save_every=2, resume=True, batch_size=4)).train()
    err = capsys.readouterr().err
    assert "trained with a global batch of 2 rows (2 x grad-accum 1 x 1 process(es)), this run takes 4" in err
    assert "--batch-size 2 keeps it" in err
    assert "keeps the checkpoint's total of 4 steps" in err
    out2 = tmp_path / "same"
    Trainer(cfg(corpus, out2, steps=4, save_every=2, stop_at_step=2)).train()
    capsys.readouterr()
    Trainer(cfg(corpus, out2, steps=4, save_every=2, resume=True)).train()
    assert "resume: note" not in capsys.readouterr().err


def test_errors_under_torchrun_are_marked_by_rank_and_a_nan_stop_said_once(corpus, tmp_path, capsys, monkeypatch):
    """Each rank printed its copy of an error, unmarked. Rank 0 says an error as it is, another rank its own marked
    [rank N] (it may be that rank's alone: its GPU, its memory); a NaN stop, decided alike everywhere, rank 0 only."""
    from thrifty.train.cli import run

    bad = cfg(corpus, tmp_path / "x", steps=0)
    monkeypatch.setenv("RANK", "1")
    assert run(bad) == 2 and "[rank 1] thrifty train: error: --steps: expected" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "")  # set but empty: rank 0, as unset
    assert run(bad) == 2 and capsys.readouterr().err.startswith("thrifty train: error: --steps: expected")
    nan = dict(steps=6, inject_nan_steps=(1, 2, 3), max_nan_steps=2)
    monkeypatch.setenv("RANK", "1")
    assert run(cfg(corpus, tmp_path / "n1", **nan)) == 3 and "consecutive" not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    assert run(cfg(corpus, tmp_path / "n0", **nan)) == 3 and "consecutive steps" in capsys.readouterr().err


def test_an_explicit_gpu_index_under_torchrun_is_refused(corpus, tmp_path, monkeypatch):
    """--device cuda:1 under torchrun put every process on GPU 1 (NCCL refuses that later, obscurely)."""
    import thrifty.train.trainer as tr

    for k, v in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(tr, "parse_device", lambda value, flag: torch.device("cuda", 1))
    t = Trainer(cfg(corpus, tmp_path / "x", device="cuda:1"))
    with pytest.raises(tr.TrainError, match=r"--device cuda:1 under torchrun: each of the 2 processes takes the GPU"):
        t._setup_distributed()


def test_no_matplotlib_skips_the_plot_not_the_finished_run(corpus, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "matplotlib" else real(m, *a))
    out = tmp_path / "r"
    Trainer(cfg(corpus, out, steps=2, plot=True)).train()
    assert (out / "summary.json").is_file() and not (out / "loss_curve.png").exists()
    assert "no loss_curve.png: matplotlib is not installed" in capsys.readouterr().err


def test_no_datasketch_is_one_line_only_where_near_dup_needs_it(corpus, tmp_path, capsys, monkeypatch):
    """datasketch does near-dup removal, which a single-document corpus never runs: `thrifty train` does not ask
    for it up front; a corpus that needs it gets one line naming the extra (it was an ImportError traceback)."""
    import sys

    from thrifty.train.cli import run

    monkeypatch.setitem(sys.modules, "datasketch", None)
    assert run(cfg(corpus, tmp_path / "many", steps=1)) == 2
    assert "near-duplicate removal needs datasketch" in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text("\n".join(prose(i, 200) for i in range(30)))
    assert run(cfg(one, tmp_path / "single", steps=1, tokenizer=None, vocab_size=300)) == 0


def test_generate_cli_text_keeps_the_space_sentencepiece_decoders_drop():
    """`thrifty generate` printed prompt + decode(new ids): a Llama-2 / Mistral style decoder strips the first
    token's leading space, so "the value is" + "▁true" read "the value istrue"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    from thrifty.train.generate_cli import generate_text

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁the": 3, "▁value": 4, "▁is": 5, "▁true": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])

    class _Model(torch.nn.Module):  # generates "▁true" after any prompt
        config = type("C", (), {"bos_token_id": 1, "vocab_size": 7, "eos_ids": [2]})()

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def generate(self, x, max_new_tokens, **kw):
            return torch.cat([x, torch.tensor([[6]])], 1)

    assert generate_text(_Model(), tok, ["the value is"], 1, temperature=0) == ["the value is true"]


def test_generate_cli_default_length_fits_a_short_context(tmp_path, capsys):
    """The fixed default of 64 new tokens was an error on any model with a context of 64 or less."""
    from thrifty.cli import main as cli

    cfg_ = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    Llama(cfg_).init_weights().save_pretrained(str(tmp_path))
    save_tokenizer(train_tokenizer([prose(i) for i in range(5)], vocab_size=320), tmp_path)
    assert cli(["generate", str(tmp_path), "--prompt", "alpha beta", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("alpha beta")
