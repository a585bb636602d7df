"""thrifty.train: a few-step run (metrics, checkpoints, HF export), exact resume, LoRA, 2-process
gloo DDP against one process, failure handling, NaN skipping, generate. Micro models, CPU."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import thrifty
from thrifty.data import save_tokenizer, train_tokenizer
from thrifty.train import TrainConfig, Trainer, parse_duration
from thrifty.train._compat import model_api
from thrifty.train.cli import run

from test_data import prose

MICRO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# Where the thrifty under test lives (the source tree with an in-place _C, or site-packages after
# pip install): subprocesses must import that same one.
THRIFTY_PATH = str(Path(thrifty.__file__).resolve().parents[1])
# micro models: one thread avoids OpenMP barrier stalls on a shared, oversubscribed box
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        (d / f"doc{i:02d}.txt").write_text(prose(i, 200))
    tok = train_tokenizer([prose(i, 200) for i in range(24)], vocab_size=320)
    save_tokenizer(tok, d / "tok")
    return d


@pytest.fixture(scope="module")
def base_model(corpus, tmp_path_factory):
    """A micro Llama saved in Hugging Face format with the corpus tokenizer."""
    Llama, LlamaConfig, _ = model_api()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, max_position_embeddings=128, eos_token_id=0, bos_token_id=0,
                      tie_word_embeddings=False, **MICRO)
    m = Llama(cfg)
    if hasattr(m, "init_weights"):
        m.init_weights()
    d = tmp_path_factory.mktemp("base")
    m.save_pretrained(str(d))
    save_tokenizer(__import__("thrifty.data", fromlist=["load_tokenizer"]).load_tokenizer(corpus / "tok"), d)
    return d


def cfg(corpus, out, **kw) -> TrainConfig:
    base = dict(data=str(corpus), tokenizer=str(corpus / "tok" / "tokenizer.json"), model_overrides=MICRO,
                batch_size=2, seq_len=32, steps=4, lr=3e-3, warmup=1, progress=False, precision="fp32", plot=False,
                eval_batches=2, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def losses(run_dir) -> dict:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_parse_duration():
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400 and parse_duration("90") == 90
    with pytest.raises(Exception, match="duration"):
        parse_duration("ten minutes")


def test_train_metrics_checkpoint_export(corpus, tmp_path):
    out = tmp_path / "run"
    res = Trainer(cfg(corpus, out, steps=12, save_every=4, keep_last=2, eval_every=6, plot=True)).train()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in rows if "loss" in r]
    assert [r["step"] for r in tr] == list(range(1, 13))
    assert all({"step", "loss", "lr", "tokens_per_s", "mfu"} <= set(r) for r in tr)
    assert tr[-1]["loss"] < tr[0]["loss"]
    va = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in va] == [6, 12] and all(r["val_ppl"] > 1 for r in va)
    assert res["steps"] == 12 and abs(res["val_loss"] - va[-1]["val_loss"]) < 1e-12
    cks = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert cks == ["step_000008", "step_000012"]  # last 2 kept, no temp dirs left
    for f in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"):
        assert (out / "checkpoints" / "step_000012" / f).is_file()
    assert (out / "loss_curve.png").stat().st_size > 1000
    # the export loads in thrifty and in transformers, with the same logits
    Llama, _, _ = model_api()
    m = Llama.from_pretrained(str(out)).float().eval()
    x = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        ours = m(x)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(x).logits
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_resume_same_trajectory(corpus, tmp_path):
    a = tmp_path / "a"
    Trainer(cfg(corpus, a, steps=6, save_every=3)).train()
    b = tmp_path / "b"
    Trainer(cfg(corpus, b, steps=6, save_every=3, stop_at_step=3)).train()  # as if killed after step 3's checkpoint
    assert sorted(losses(b)) == [1, 2, 3]
    Trainer(cfg(corpus, b, steps=6, save_every=3, resume=True)).train()
    la, lb = losses(a), losses(b)
    assert sorted(lb) == list(range(1, 7))
    assert lb == la  # bit-identical


def test_kill_and_resume_matches_uninterrupted(corpus, base_model, tmp_path):
    """`thrifty train` in a subprocess, SIGKILLed as soon as a checkpoint exists (wherever it then is:
    mid-step, mid-eval, mid-save), resumed with --resume: the losses of every step and the final
    weights are bit-identical to an uninterrupted run, and no half-written checkpoint is used or left."""
    from safetensors.torch import load_file

    steps, every = 30, 4
    tok = str(corpus / "tok" / "tokenizer.json")
    argv = ["--model", str(base_model), "--tokenizer", tok, "--data", str(corpus), "--seq-len", "32", "--batch-size", "2",
            "--steps", str(steps), "--lr", "3e-3", "--warmup", "1", "--precision", "fp32", "--no-progress",
            "--eval-every", "10", "--eval-batches", "2", "--save-every", str(every), "--keep-last", "2"]
    env = {**os.environ, "PYTHONPATH": THRIFTY_PATH + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}  # one thread as in this process: same reductions, bit-identical results
    killed = tmp_path / "killed"
    ckroot = killed / "checkpoints"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "thrifty.cli", "train", *argv, "--out", str(killed)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline:
                if ckroot.is_dir() and any(p.name.startswith("step_") for p in ckroot.iterdir()):
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None and time.monotonic() >= deadline:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    done = sorted(int(p.name[5:]) for p in ckroot.iterdir() if p.name.startswith("step_"))
    assert done and done[-1] < steps and not (killed / "model.safetensors").exists()  # killed mid-run
    # what a kill during a save leaves: a temp directory with a truncated state (never renamed)
    half = ckroot / f".tmp-step_{done[-1] + every:06d}-999999"
    half.mkdir(exist_ok=True)
    (half / "trainer_state.pt").write_bytes(b"PK\x03\x04 truncated")

    common = dict(model=str(base_model), model_overrides=None, steps=steps, save_every=every, keep_last=2,
                  eval_every=10, lr=3e-3)
    assert run(cfg(corpus, killed, resume=True, **common)) == 0
    ref = tmp_path / "ref"
    assert run(cfg(corpus, ref, **common)) == 0
    lk, lr_ = losses(killed), losses(ref)
    assert sorted(lk) == list(range(1, steps + 1))
    assert lk == lr_  # bit-identical trajectory across the kill
    wk, wr = load_file(str(killed / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert wk.keys() == wr.keys() and all(torch.equal(wk[k], wr[k]) for k in wr)
    assert not list(killed.rglob(".tmp-*"))
    assert sorted(p.name for p in ckroot.iterdir()) == [f"step_{steps // every * every:06d}", f"step_{steps:06d}"]


def test_lora_trains_only_adapters_and_merges(corpus, base_model, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    t = Trainer(cfg(corpus, out, model=str(base_model), model_overrides=None, lora_rank=4,
                    lora_targets=("q_proj", "v_proj"), steps=3, lr=5e-2))
    t.train()
    named = dict(t.raw_model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert t.n_trainable == sum(named[n].numel() for n in trainable)
    base = load_file(str(base_model / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(base)  # original names, adapters folded in
    state = torch.load(out / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=False)
    changed = []
    for k, w in base.items():
        if k.endswith(("q_proj.weight", "v_proj.weight")):
            mod = k[: -len(".weight")]
            A, B = state["lora"][f"{mod}.lora_A"], state["lora"][f"{mod}.lora_B"]
            expect = w.float() + t.raw_model.get_submodule(mod).scale * (B.float() @ A.float())
            assert torch.allclose(merged[k].float(), expect, atol=1e-6)
            changed.append(not torch.equal(merged[k], w))
        else:
            assert torch.equal(merged[k], w), k  # the frozen base is untouched
    assert all(changed)


def test_lora_on_tied_lm_head_exports_untied(corpus, tmp_path):
    """LoRA on lm_head of a model with tied embeddings: the export unties them (tie_word_embeddings false,
    both weights written), so thrifty and transformers load it with the trained model's logits."""
    out = tmp_path / "lora"
    t = Trainer(cfg(corpus, out, lora_rank=4, lora_targets=("q_proj", "lm_head"), steps=3, lr=5e-2))
    t.train()
    assert t.model_config.tie_word_embeddings  # the preset ties them
    conf = json.loads((out / "config.json").read_text())
    assert conf["tie_word_embeddings"] is False
    from safetensors.torch import load_file
    sd = load_file(str(out / "model.safetensors"))
    assert not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])  # the adapter is in the head
    x = torch.randint(0, 320, (1, 16))
    t.raw_model.eval()
    with torch.no_grad():
        trained = t.raw_model(x)
    Llama, _, _ = model_api()
    m = Llama.from_pretrained(str(out)).float().eval()
    with torch.no_grad():
        assert torch.allclose(m(x), trained, rtol=1e-4, atol=1e-4)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, trained, rtol=1e-4, atol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_processes(base_model, corpus, out, *flags) -> subprocess.CompletedProcess:
    """`thrifty train` under torchrun, 2 processes of one thread, on the micro model in fp32."""
    env = {**os.environ, "PYTHONPATH": THRIFTY_PATH + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(_free_port()), "-m", "thrifty.cli", "train", "--model", str(base_model),
                        "--data", str(corpus), "--seq-len", "32", "--warmup", "1", "--precision", "fp32", "--no-progress",
                        "--out", str(out), *flags], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_ddp_two_processes_match_single(corpus, base_model, tmp_path):
    ddp = tmp_path / "ddp"
    r = _train_two_processes(base_model, corpus, ddp, "--steps", "3", "--lr", "1e-2", "--eval-every", "100",
                             "--batch-size", "2")
    assert "2 process(es)" in r.stderr and "DDP" in r.stderr
    single = tmp_path / "single"
    assert run(cfg(corpus, single, model=str(base_model), model_overrides=None, batch_size=2, grad_accum=2, steps=3,
                   lr=1e-2, eval_every=100)) == 0
    ld, ls = losses(ddp), losses(single)
    assert sorted(ld) == [1, 2, 3]
    for k in ld:
        assert abs(ld[k] - ls[k]) <= 1e-5 * abs(ls[k]), (k, ld[k], ls[k])


def test_validation_loss_is_the_same_at_any_world_size(corpus, base_model, tmp_path):
    """Validation scores the first eval-batches global batches whatever the split (each process its share,
    the sums reduced); it scored eval-batches x the per-process batch, a smaller set on more processes. An lr of
    1e-12 leaves the weights as they were, so the two runs score one model (Adam's first steps move weights
    whose gradients differ in the last bits by up to 2 lr, which would hide the rows' effect)."""
    ddp = tmp_path / "ddp"
    _train_two_processes(base_model, corpus, ddp, "--steps", "1", "--lr", "1e-12", "--eval-batches", "3",
                         "--batch-size", "1")
    single = tmp_path / "single"
    assert run(cfg(corpus, single, model=str(base_model), model_overrides=None, batch_size=2, steps=1, lr=1e-12,
                   eval_batches=3)) == 0
    vd, vs = (_val_losses(d) for d in (ddp, single))
    assert sorted(vd) == sorted(vs) == [1] and abs(vd[1] - vs[1]) <= 1e-6 * abs(vs[1]), (vd, vs)


def _val_losses(run_dir) -> dict:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


# ---- failures ----
def _fails(capsys, config, code, pattern, out):
    assert run(config) == code
    err = capsys.readouterr().err
    assert pattern in err, err[-2000:]
    return err


def test_failures_leave_nothing(corpus, base_model, tmp_path, capsys):
    out = tmp_path / "r"
    _fails(capsys, cfg(corpus, out, data=str(tmp_path / "missing")), 2, "does not exist", out)
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    _fails(capsys, cfg(corpus, out, data=str(tmp_path / "empty")), 2, "no data files", out)
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("too short")
    _fails(capsys, cfg(corpus, out, data=str(tmp_path / "short"), tokenizer=None), 2, "no text left after filtering", out)
    assert not out.exists()
    # a tokenizer larger than the model's vocabulary
    Llama, LlamaConfig, _ = model_api()
    small = tmp_path / "small_vocab"
    Llama(LlamaConfig(vocab_size=64, max_position_embeddings=128, **MICRO)).save_pretrained(str(small))
    _fails(capsys, cfg(corpus, out, model=str(small), model_overrides=None), 2, "vocab mismatch", out)
    assert not out.exists()
    # fine-tuning a model that has no tokenizer.json, with none given: not a fresh BPE unrelated to it
    _fails(capsys, cfg(corpus, out, model=str(small), model_overrides=None, tokenizer=None), 2,
           "has no tokenizer.json", out)
    assert not out.exists()
    # a batch that cannot fit in memory
    _fails(capsys, cfg(corpus, out, batch_size=1_000_000, seq_len=64), 2, "does not fit", out)
    assert not out.exists()
    _fails(capsys, cfg(corpus, out, resume=True), 2, "no checkpoint", out)
    assert not out.exists()
    for vf in (2.0, 1.0, -0.1, float("nan")):
        _fails(capsys, cfg(corpus, out, val_fraction=vf), 2, "--val-fraction: expected a fraction in [0, 1)", out)
        assert not out.exists()


def test_bad_options_and_model_dirs_fail_before_writing(corpus, base_model, tmp_path, capsys):
    """Options out of range, a --device that is not there, a --model that is missing or quantized: a message
    naming the real problem, exit 2, nothing written (the data is not even prepared)."""
    import shutil

    out = tmp_path / "r"
    for kw, msg in ((dict(warmup=-5), "--warmup"), (dict(grad_clip=float("nan")), "--grad-clip"),
                    (dict(grad_clip=-1.0), "--grad-clip"), (dict(lora_rank=2, lora_alpha=-1.0), "--lora-alpha"),
                    (dict(eval_batches=0), "--eval-batches"), (dict(max_nan_steps=0), "--max-nan-steps"),
                    (dict(eval_every=0), "--eval-every"), (dict(keep_last=0), "--keep-last"),
                    (dict(device="bogus"), "--device"), (dict(device="tpu"), "--device")):
        _fails(capsys, cfg(corpus, out, **kw), 2, msg, out)
        assert not out.exists()
    if not torch.cuda.is_available():
        _fails(capsys, cfg(corpus, out, device="cuda"), 2, "no CUDA device", out)
        assert not out.exists()
    # a --model that does not exist: said so, not "has no tokenizer.json"
    err = _fails(capsys, cfg(corpus, out, model=str(tmp_path / "no" / "such"), model_overrides=None, tokenizer=None),
                 2, "does not exist", out)
    assert "tokenizer" not in err and not out.exists()
    # a quantized directory (thrifty quantize / save_pretrained of a quantized model) cannot be trained or exported
    qdir = tmp_path / "quantized"
    shutil.copytree(base_model, qdir)
    conf = json.loads((qdir / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "thrifty", "format_version": 1}
    (qdir / "config.json").write_text(json.dumps(conf))
    for lora in (0, 4):
        _fails(capsys, cfg(corpus, out, model=str(qdir), model_overrides=None, tokenizer=None, lora_rank=lora), 2,
               "holds a quantized model", out)
        assert not out.exists()


def test_metrics_are_strict_json_when_a_step_is_skipped(corpus, tmp_path):
    """A skipped step's NaN loss is written as null: metrics.jsonl and summary.json parse without NaN support."""
    out = tmp_path / "r"
    Trainer(cfg(corpus, out, steps=3, inject_nan_steps=(2,), plot=True)).train()

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    rows = [strict(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    skipped = [r for r in rows if r.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["loss"] is None and skipped[0]["grad_norm"] is None
    assert all(isinstance(r["loss"], float) for r in rows if not r.get("skipped"))
    strict((out / "summary.json").read_text())
    assert (out / "loss_curve.png").is_file()


def test_val_fraction_zero_means_no_validation(corpus, tmp_path):
    res = Trainer(cfg(corpus, tmp_path / "r", val_fraction=0.0, steps=2)).train()
    assert res["steps"] == 2 and "val_loss" not in res


def test_bad_tokenizer_or_model_files_fail_cleanly(corpus, base_model, tmp_path, capsys):
    """A tokenizer.json that is not one and a corrupt model.safetensors: a message, exit 2, nothing written."""
    import shutil

    out = tmp_path / "r"
    for name, content in (("garbage.json", b"garbage\n"), ("binary.json", b"\xff\xfe\x00"),
                          ("wrong.json", b'{"model": {"type": "Nope"}}')):
        (tmp_path / name).write_bytes(content)
        _fails(capsys, cfg(corpus, out, tokenizer=str(tmp_path / name)), 2, "tokenizer.json", out)
        assert not out.exists()
    model = tmp_path / "corrupt_model"
    shutil.copytree(base_model, model)
    data = (model / "model.safetensors").read_bytes()
    for bad in (b"not safetensors" * 10, data[: len(data) // 2]):
        (model / "model.safetensors").write_bytes(bad)
        _fails(capsys, cfg(corpus, out, model=str(model), model_overrides=None, tokenizer=None), 2,
               "corrupt or truncated", out)
        assert not out.exists()
    # the command line: no traceback
    env = {**os.environ, "PYTHONPATH": THRIFTY_PATH + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "thrifty.cli", "train", "--data", str(corpus), "--tokenizer",
                        str(tmp_path / "garbage.json"), "--steps", "1", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "tokenizer.json" in r.stderr, r.stderr[-2000:]
    assert not out.exists()


def test_existing_run_needs_resume(corpus, tmp_path, capsys):
    out = tmp_path / "r"
    assert run(cfg(corpus, out, steps=2)) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    _fails(capsys, cfg(corpus, out, steps=2), 2, "--resume", out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before and (out / "model.safetensors").is_file()
    # a run killed while writing its first checkpoint left only a temp directory: a fresh run may start there
    stale = tmp_path / "stale"
    (stale / "checkpoints" / ".tmp-step_000002-123").mkdir(parents=True)
    assert run(cfg(corpus, stale, steps=2)) == 0
    assert not list(stale.rglob(".tmp-*")) and (stale / "checkpoints" / "step_000002").is_dir()


def test_resume_finished_run_nothing_to_do(corpus, tmp_path, capsys):
    """--resume of a run already at --steps: says so, exits 0 and leaves the export and summary untouched;
    a larger --steps continues it."""
    out = tmp_path / "r"
    assert run(cfg(corpus, out, steps=2)) == 0
    kept = {f: (out / f).read_bytes() for f in ("summary.json", "model.safetensors", "config.json", "metrics.jsonl",
                                                  "train_config.json")}
    capsys.readouterr()
    assert run(cfg(corpus, out, steps=2, resume=True)) == 0
    assert "run already at step 2 of 2: nothing to do" in capsys.readouterr().err
    assert {f: (out / f).read_bytes() for f in kept} == kept
    assert json.loads(kept["summary.json"])["final_loss"] is not None
    # killed between the last checkpoint and the export: the resume writes the missing export
    (out / "summary.json").unlink()
    (out / "model.safetensors").unlink()
    assert run(cfg(corpus, out, steps=2, resume=True)) == 0
    assert (out / "model.safetensors").read_bytes() == kept["model.safetensors"]
    assert json.loads((out / "summary.json").read_text())["final_loss"] == json.loads(kept["summary.json"])["final_loss"]
    assert run(cfg(corpus, out, steps=4, resume=True)) == 0
    assert sorted(losses(out)) == [1, 2, 3, 4] and json.loads((out / "summary.json").read_text())["steps"] == 4


def test_nan_step_skipped(corpus, tmp_path):
    out = tmp_path / "r"
    res = Trainer(cfg(corpus, out, steps=4, inject_nan_steps=(2,))).train()
    assert res["nan_skipped"] == 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows if "loss" in r] == [False, True, False, False]
    from safetensors.torch import load_file
    assert all(torch.isfinite(p).all() for p in load_file(str(out / "model.safetensors")).values())


def test_repeated_nan_stops_with_good_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "r"
    err = _fails(capsys, cfg(corpus, out, steps=10, save_every=2, max_nan_steps=2, inject_nan_steps=tuple(range(3, 11))),
                 3, "consecutive steps with a non-finite loss", out)
    assert "step_000002" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"]
    assert not (out / "model.safetensors").exists()  # no final export from a diverged run
    Llama, _, _ = model_api()
    m = Llama.from_pretrained(str(out / "checkpoints" / "step_000002"))
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_generate_cli(corpus, tmp_path, capsys):
    from thrifty.train import generate_cli

    out = tmp_path / "r"
    assert run(cfg(corpus, out, steps=2)) == 0
    capsys.readouterr()
    args = Namespace(model_dir=str(out), prompt=["alpha beta"], max_new_tokens=8, temperature=0.0, top_k=50,
                     top_p=0.95, seed=0, device="cpu")
    assert generate_cli.main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("alpha beta")
    args.model_dir = str(tmp_path / "nothing")
    assert generate_cli.main(args) == 2
    # sampling options out of range, a corrupt model: a message and exit 2, no traceback
    capsys.readouterr()
    for k, v, msg in (("max_new_tokens", 100000, "max_position_embeddings"), ("temperature", -1.0, "--temperature"),
                      ("max_new_tokens", -1, "--max-new-tokens"), ("top_p", 0.0, "--top-p")):
        bad = Namespace(**{**vars(args), "model_dir": str(out), k: v})
        assert generate_cli.main(bad) == 2
        assert msg in capsys.readouterr().err
    import shutil
    corrupt = tmp_path / "corrupt"
    shutil.copytree(out, corrupt, ignore=shutil.ignore_patterns("checkpoints"))
    (corrupt / "model.safetensors").write_bytes(b"\0" * 100)
    args.model_dir = str(corrupt)
    assert generate_cli.main(args) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    (corrupt / "config.json").write_text("{not json")
    assert generate_cli.main(args) == 2
    capsys.readouterr()
    for dev in ("bogus", "tpu") + (() if torch.cuda.is_available() else ("cuda",)):
        assert generate_cli.main(Namespace(**{**vars(args), "model_dir": str(out), "device": dev})) == 2
        assert "--device" in capsys.readouterr().err


def test_demo_loss_points_each_step_once():
    from thrifty.train.demo import loss_points

    for n in (0, 1, 5, 8, 16, 17, 100):
        steps = [r["step"] for r in loss_points([{"step": s} for s in range(1, n + 1)])]
        assert steps == sorted(set(steps)) and (not n or steps[0] == 1 and steps[-1] == n)
    assert [r["step"] for r in loss_points([{"step": s} for s in range(1, 17)])] == [1, 3, 5, 7, 9, 11, 13, 15, 16]


@pytest.mark.slow
def test_fsdp_two_processes_match_single(corpus, base_model, tmp_path):
    common = ["--model", str(base_model), "--data", str(corpus), "--seq-len", "32", "--steps", "3", "--lr", "1e-2",
              "--warmup", "1", "--precision", "fp32", "--no-progress", "--eval-every", "100", "--save-every", "3"]
    env = {**os.environ, "PYTHONPATH": THRIFTY_PATH + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    fs = tmp_path / "fsdp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(_free_port()), "-m", "thrifty.cli", "train", *common, "--fsdp",
                        "--batch-size", "2", "--out", str(fs)], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FSDP2" in r.stderr
    single = tmp_path / "single"
    assert run(cfg(corpus, single, model=str(base_model), model_overrides=None, batch_size=2, grad_accum=2, steps=3,
                   lr=1e-2, eval_every=100)) == 0
    lf, ls = losses(fs), losses(single)
    assert sorted(lf) == [1, 2, 3]
    for k in lf:  # torch.optim.AdamW on the shards vs thrifty's fused AdamW: same math, float32 rounding
        assert abs(lf[k] - ls[k]) <= 1e-4 * abs(ls[k]), (k, lf[k], ls[k])
    # the gathered full checkpoint loads as a plain model
    Llama, _, _ = model_api()
    Llama.from_pretrained(str(fs / "checkpoints" / "step_000003"))


@pytest.mark.slow
def test_compile_matches_eager(corpus, tmp_path):
    """--compile: the model runs through torch.compile (inductor) and trains to the eager losses."""
    import torch._dynamo

    eager = Trainer(cfg(corpus, tmp_path / "eager", steps=2, eval_every=100)).train()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    t = Trainer(cfg(corpus, tmp_path / "compiled", steps=2, eval_every=100, compile=True))
    res = t.train()
    assert isinstance(t.model, torch._dynamo.eval_frame.OptimizedModule)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    le, lc = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(lc) == [1, 2]
    for k in le:
        assert abs(lc[k] - le[k]) <= 1e-4 * abs(le[k]), (k, lc[k], le[k])
    assert abs(res["val_loss"] - eager["val_loss"]) <= 1e-4 * abs(eager["val_loss"])
    torch._dynamo.reset()


def test_train_on_parquet(tmp_path):
    """`--data file.parquet --text-field body` trains like a directory of .txt files."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from test_data import write_corpus

    texts = [prose(i, 200) for i in range(24)]
    pq.write_table(pa.table({"body": texts, "n": list(range(24))}), tmp_path / "docs.parquet")
    tok = tmp_path / "tok"
    save_tokenizer(train_tokenizer(texts, vocab_size=320), tok)
    common = dict(tokenizer=str(tok / "tokenizer.json"), steps=3, eval_every=100)
    res = Trainer(cfg(tmp_path, tmp_path / "pq", data=str(tmp_path / "docs.parquet"), text_field="body", **common)).train()
    txt = write_corpus(tmp_path / "txt", 24)
    ref = Trainer(cfg(tmp_path, tmp_path / "txt_run", data=str(txt), **common)).train()
    assert res["steps"] == 3 and losses(tmp_path / "pq") == losses(tmp_path / "txt_run")
    assert res["val_loss"] == ref["val_loss"]


def test_bf16_master_weights(corpus, tmp_path):
    t = Trainer(cfg(corpus, tmp_path / "r", precision="bf16", steps=2))
    res = t.train()
    assert all(p.dtype == torch.bfloat16 for p in t.raw_model.parameters())
    if t.master_weights:  # thrifty.optim present: float32 masters live in the optimizer
        assert type(t.optimizer).__module__.startswith("thrifty.optim")
    assert res["final_loss"] == res["final_loss"] and res["steps"] == 2


def test_bf16_without_master_weights(corpus, tmp_path):
    """--no-master-weights (with 8-bit moments: the leanest setup): bf16 params updated in place, no float32
    copies in the optimizer state, and the run still learns."""
    t = Trainer(cfg(corpus, tmp_path / "r", precision="bf16", steps=6, master_weights=False, optimizer="adamw8bit",
                    activation_checkpointing=True, lr=1e-2))
    t.train()
    assert not t.master_weights and all(p.dtype == torch.bfloat16 for p in t.raw_model.parameters())
    assert t.optimizer.state and not any("master" in s for s in t.optimizer.state.values())
    tr = losses(tmp_path / "r")
    assert tr[6] < tr[1]


def test_qlora_base_keeps_multihead_attention_out_proj_float():
    """nn.MultiheadAttention reads out_proj.weight directly: QLoRA's quantize_base leaves it in floating point
    (as quantize_model does) and quantizes the rest; forward and backward run."""
    from thrifty.train.lora import apply_lora, quantize_base

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    assert quantize_base(layer, bits=4, group_size=32) == ["linear1", "linear2"]
    assert type(layer.self_attn.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    apply_lora(layer, 4, targets="linear1,linear2")
    layer(torch.randn(2, 10, 64)).sum().backward()
    assert layer.linear1.lora_B.grad is not None and layer.linear2.lora_B.grad.abs().sum() > 0


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def test_failed_resume_leaves_run_dir_byte_identical(corpus, tmp_path, capsys):
    """A --resume that fails (other data, so another trained tokenizer; another --seq-len) must not leave a new
    tokenizer.json / data cache next to checkpoints trained with the old ones: RUN_DIR stays byte for byte."""
    out = tmp_path / "r"
    assert run(cfg(corpus, out, tokenizer=None, vocab_size=320, steps=3, save_every=3)) == 0
    before = _tree(out)
    other = tmp_path / "other"
    for i in range(24):
        (other / f"doc{i:02d}.txt").parent.mkdir(exist_ok=True)
        (other / f"doc{i:02d}.txt").write_text(prose(100 + i, 300).upper())
    _fails(capsys, cfg(corpus, out, data=str(other), tokenizer=None, vocab_size=320, steps=5, resume=True), 2,
           "tokenizer differs", out)
    assert _tree(out) == before
    _fails(capsys, cfg(corpus, out, tokenizer=None, vocab_size=320, steps=5, seq_len=16, resume=True), 2,
           "sampler state", out)
    assert _tree(out) == before
    assert run(cfg(corpus, out, tokenizer=None, vocab_size=320, steps=5, resume=True)) == 0  # still resumable


class _StepClock:
    """The trainer's clock in a test: time passes only in training steps (first_step s for the first, step s
    for the others), so a --time-budget run's step count does not depend on how loaded the machine is."""

    def __init__(self, first_step: float, step: float):
        self.now, self.first_step, self.step, self.steps = 1000.0, first_step, step, 0

    def perf_counter(self) -> float:
        return self.now

    def advance(self) -> None:
        self.steps += 1
        self.now += self.first_step if self.steps == 1 else self.step

    def __getattr__(self, name):  # everything else of the time module
        return getattr(time, name)


def _step_clock(monkeypatch, first_step: float, step: float) -> _StepClock:
    """Puts the trainer on a _StepClock (the MFU denominator measured on the real clock first)."""
    import thrifty.train.trainer as trainer_mod

    for dtype in (torch.float32, torch.bfloat16):
        trainer_mod.measured_matmul_flops(torch.device("cpu"), dtype)
    clock = _StepClock(first_step, step)
    monkeypatch.setattr(trainer_mod, "time", clock)
    train_step = Trainer.train_step

    def timed_step(self):
        clock.advance()
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    return clock


def test_time_budget_ends_close_to_the_budget(corpus, tmp_path, monkeypatch):
    """The step count of a --time-budget run comes from the steady step rate (the slow first steps of a process
    left out, estimated again early on), so the run uses its budget instead of stopping well short of it (the
    first step takes 0.3 s here against 10 ms for the others, like a first step's allocations and kernel choice
    on a real model)."""
    clock = _step_clock(monkeypatch, first_step=0.3, step=0.01)
    budget = 2.0
    out = tmp_path / "r"
    res = Trainer(cfg(corpus, out, steps=None, time_budget=budget, eval_every=1000)).train()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert res["steps"] == rows[-1]["step"] == clock.steps
    # 0.3 s + (n - 1) x 10 ms: the budget is used to within a step (a rate taken over the first step would
    # have stopped after ~7 steps)
    assert budget - 0.011 <= rows[-1]["elapsed_s"] <= budget + 0.011, (rows[-1], len(rows))


def test_short_time_budget_warms_up_to_the_peak_lr(corpus, tmp_path, monkeypatch):
    """Without --warmup, a --time-budget run warms up over 5% of its estimated steps (as --steps does), not over a
    fixed 100: a run of ~60 steps reaches its peak lr and decays from it."""
    _step_clock(monkeypatch, first_step=0.05, step=0.01)
    out = tmp_path / "r"
    Trainer(cfg(corpus, out, steps=None, warmup=None, time_budget=0.65, eval_every=1000)).train()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "lr" in x]
    lrs = [r["lr"] for r in rows]
    assert 50 <= len(rows) <= 70
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert lrs[peak] > 0.95 * 3e-3 and peak < 10 and lrs[-1] < 0.2 * 3e-3, lrs


def test_time_budget_resume_keeps_the_schedule(corpus, tmp_path, monkeypatch):
    """The final step estimate of a --time-budget run is saved with the checkpoint: a --resume keeps it (the
    same learning-rate schedule) instead of estimating a new one from the resumed process's speed."""
    from thrifty.train import trainer as trmod
    monkeypatch.setattr(trmod, "BUDGET_ESTIMATE_FRACTION", 0.0)  # final at the first estimate (step 3)
    out = tmp_path / "r"
    Trainer(cfg(corpus, out, steps=None, time_budget=3.0, save_every=5, stop_at_step=5, eval_every=1000)).train()
    state = torch.load(out / "checkpoints" / "step_000005" / "trainer_state.pt", weights_only=False)
    total = state["schedule_total"]
    assert state["budget_final"] == 3.0 and 5 < total < 10**9
    t = Trainer(cfg(corpus, out, steps=None, time_budget=3.0, save_every=5, resume=True, eval_every=1000))
    res = t.train()
    assert t.schedule.total == total and res["steps"] <= total
    sched = trmod.WarmupCosine(1, total, t.cfg.min_lr_ratio)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows][:6] == [1, 2, 3, 4, 5, 6]
    for r in rows[4:]:  # from the first step after the estimate on, before and after the resume
        assert r["lr"] == pytest.approx(t.cfg.lr * sched(r["step"] - 1), rel=1e-6), r


def test_save_every_zero_saves_only_at_the_end(corpus, tmp_path, capsys):
    """--save-every 0: no periodic checkpoint, the one at the end still (as the help says); negative: refused."""
    out = tmp_path / "r"
    _fails(capsys, cfg(corpus, out, save_every=-1), 2, "--save-every", out)
    assert not out.exists()
    assert run(cfg(corpus, out, steps=3, save_every=0)) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003"]
    assert Trainer(cfg(corpus, out, steps=4, save_every=0, resume=True)).train()["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003", "step_000004"]


def test_resume_says_what_the_checkpoint_keeps_and_what_is_damaged(corpus, tmp_path, capsys):
    """--lr / --weight-decay / --warmup given with --resume were dropped silently (the optimizer's and the
    schedule's state carry the checkpoint's) while train_config.json recorded them as used. A damaged newest
    checkpoint: a missing model.safetensors was a bare 'No such file' (no hint), a missing trainer_state.pt
    skipped it without a word."""
    out = tmp_path / "r"
    assert run(cfg(corpus, out, steps=2, save_every=1)) == 0
    capsys.readouterr()
    assert run(cfg(corpus, out, steps=3, resume=True, lr=5e-2, weight_decay=0.5, warmup=2)) == 0
    err = capsys.readouterr().err
    for flag, kept in (("--lr 0.05", "0.003"), ("--weight-decay 0.5", "0.1"), ("--warmup 2", "warmup of 1 steps")):
        assert f"resume: note: {flag} is not applied" in err and kept in err, err
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["lr"], saved["weight_decay"], saved["warmup"]) == (3e-3, 0.1, 1)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert rows[-1]["lr"] < 3e-3  # the checkpoint's schedule, not 5e-2
    # options left at their defaults are not "given": no note (the checkpoint's lr 3e-3 against the default)
    assert run(TrainConfig(**{**vars(cfg(corpus, out, steps=4, resume=True, save_every=1)), "lr": None,
                              "weight_decay": 0.1, "warmup": None})) == 0
    assert "is not applied" not in capsys.readouterr().err
    ck = out / "checkpoints"
    (ck / "step_000004" / "model.safetensors").unlink()
    err = _fails(capsys, cfg(corpus, out, steps=5, resume=True), 2, "model.safetensors missing; remove ", out)
    assert "step_000004 to resume from the checkpoint before it" in err
    (ck / "step_000004" / "trainer_state.pt").unlink()
    assert run(cfg(corpus, out, steps=5, resume=True)) == 0
    err = capsys.readouterr().err
    assert "step_000004 in" in err and "no trainer_state.pt (damaged): skipped, resuming from step_000003" in err
    assert err.count("(damaged)") == 1


def test_time_budget_resume_measures_its_own_steps(corpus, tmp_path, monkeypatch):
    """A --time-budget resume with a larger budget fixed its step count after one measured step (the share of
    the budget already spent counted as measurement time): one slow step made it stop far short of the budget.
    The estimate now keeps being refined over a share of what this process has of the budget, and the log says
    that the schedule's length is estimated anew."""
    _step_clock(monkeypatch, first_step=0.01, step=0.01)
    out = tmp_path / "r"
    Trainer(cfg(corpus, out, steps=None, time_budget=1.0, eval_every=1000)).train()
    clock = _step_clock(monkeypatch, first_step=0.01, step=0.01)
    advance = clock.advance

    def one_slow_measured_step():  # the resumed process's 3rd step (its first measured one) takes 0.1 s
        advance()
        if clock.steps == 3:
            clock.now += 0.09
    clock.advance = one_slow_measured_step
    logged = []
    t = Trainer(cfg(corpus, out, steps=None, time_budget=3.0, resume=True, eval_every=1000))
    log = t.log
    t.log = lambda msg: (logged.append(msg), log(msg))
    t.train()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    # the slow step stays in the measured window (the rate is a little low, the end a little early); fixed after
    # that one step the run stopped at ~1.3 s
    assert 2.5 < rows[-1]["elapsed_s"] <= 3.01, rows[-1]
    assert any("--time-budget 3.0 is not the checkpoint's 1.0" in m for m in logged), logged


def test_sigterm_ends_the_run_as_ctrl_c_does(corpus, tmp_path):
    """SIGTERM (kill, docker stop, a scheduler's preemption) killed the run without a word (status -15); it now
    says, as Ctrl-C does, which checkpoint is intact and that --resume continues (exit 143), and the resume
    works. Interrupted before any checkpoint, or in thrifty demo (no --resume), the message says to start over."""
    out = tmp_path / "r"
    argv = ["--data", str(corpus), "--tokenizer", str(corpus / "tok" / "tokenizer.json"), "--preset", "tiny",
            "--seq-len", "32", "--batch-size", "2", "--steps", "100000", "--save-every", "1", "--no-progress",
            "--precision", "fp32", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": THRIFTY_PATH + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "thrifty", "train", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline and not list(out.glob("checkpoints/step_*")):
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    done = max(int(p.name[5:]) for p in out.glob("checkpoints/step_*"))
    assert err.rstrip().endswith(f"thrifty train: terminated; the checkpoints up to step_{done:06d} are intact: "
                                 "continue with --resume"), err[-3000:]
    assert run(cfg(corpus, out, steps=done + 1, resume=True, model_overrides=None, preset="tiny")) == 0


def test_generate_notes_checkpoints_newer_than_the_export(corpus, tmp_path, capsys):
    """A finished run resumed with more --steps and stopped before its end keeps its earlier export, which
    thrifty generate reads: it now says the checkpoints are newer."""
    from thrifty.train import generate_cli

    out = tmp_path / "r"
    assert run(cfg(corpus, out, steps=2)) == 0
    assert run(cfg(corpus, out, steps=4, resume=True, save_every=1, stop_at_step=3)) == 0
    capsys.readouterr()
    args = Namespace(model_dir=str(out), prompt=["alpha"], max_new_tokens=2, temperature=0.0, top_k=50, top_p=0.95,
                     seed=0, device="cpu")
    assert generate_cli.main(args) == 0
    err = capsys.readouterr().err
    assert "exported model is from step 2, its newest checkpoint from step 3" in err and err.count("note:") == 1, err


def test_interrupt_message_offers_what_works(corpus, tmp_path, monkeypatch, capsys):
    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "train", interrupted)
    assert run(cfg(corpus, tmp_path / "r")) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted before the first checkpoint: nothing to resume; the "
                                                    "same command starts over")
    assert run(cfg(corpus, tmp_path / "r"), prog="thrifty demo", restart_only=True) == 130
    assert capsys.readouterr().err.strip() == "thrifty demo: interrupted; run it again to start over"


def test_bare_resume_of_a_model_run_takes_the_runs_own_options(corpus, base_model, tmp_path, capsys):
    """`thrifty train --out RUN --resume` of a --model run: the model, data, steps and step shape come from the
    run (it built the default preset and a new tokenizer, then failed on the tokenizer mismatch); the export
    keeps the --model's generation_config.json (extra stop tokens live only there)."""
    (base_model / "generation_config.json").write_text('{"eos_token_id": [0, 5], "temperature": 0.6}')
    try:
        out = tmp_path / "r"
        assert run(cfg(corpus, out, model=str(base_model), model_overrides=None, steps=4, save_every=2,
                       stop_at_step=2)) == 0
        capsys.readouterr()
        assert run(TrainConfig(out=str(out), resume=True, progress=False, plot=False, precision="fp32")) == 0
        err = capsys.readouterr().err
        for said in ("no --model given", "no --data given", "going on to the run's own --steps 4",
                     "--batch-size not given (or the default): using the run's own 2", "--seq-len not given"):
            assert said in err, (said, err[-2000:])
        assert sorted(losses(out)) == [1, 2, 3, 4]
        assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [0, 5]
    finally:
        (base_model / "generation_config.json").unlink()
