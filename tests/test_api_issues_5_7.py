"""The APIs issues 5-7 name, as a user calls them: argument checks that name the argument, the
shapes of what comes back, CLI flags and files. Each test failed before the fix it covers.
Micro models, CPU only, a few seconds each."""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import thrifty
from thrifty.models import Llama, LlamaConfig
from thrifty.nn import QuantLinear
from thrifty.quant import quantize_model

from test_data import prose

THRIFTY_PATH = str(Path(thrifty.__file__).resolve().parents[1])
MICRO = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def micro_llama(seed=0, **kw) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**{**MICRO, **kw})).init_weights().eval()


# ================= issue 5: quantization =================
@pytest.mark.parametrize("kw, exc, arg", [
    (dict(bits=3), ValueError, "'bits'"),
    (dict(bits=8, act_bits=4), ValueError, "'act_bits'"),
    (dict(bits=4, group_size=48), ValueError, "'group_size'"),
    (dict(bits=4, group_size=64, act_bits=8), ValueError, "act_bits=8"),
    (dict(bits=8.0), TypeError, "'bits'"),
])
def test_from_float_bad_options_name_the_argument(kw, exc, arg):
    with pytest.raises(exc, match=arg):
        QuantLinear.from_float(torch.nn.Linear(128, 16), **kw)


@pytest.mark.parametrize("config, arg", [({"bits": 3}, "'bits'"), ({"bits": 8, "act_bits": 2}, "'act_bits'"),
                                         ({"bits": 4, "group_size": 40}, "'group_size'")])
def test_quantize_model_bad_config_names_the_field(config, arg):
    with pytest.raises(ValueError, match=arg):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(128, 16)), config)


def test_quantize_model_group_size_error_names_the_layer():
    model = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.Linear(96, 8))
    with pytest.raises(ValueError, match="'1'.*in_features=96.*group_size=64"):
        quantize_model(model, {"bits": 4, "group_size": 64})


def test_gptq_import_out_features_not_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        QuantLinear.from_gptq(torch.zeros(4, 60, dtype=torch.int32), torch.zeros(1, 7, dtype=torch.int32),
                              torch.ones(1, 60, dtype=torch.float16))


def test_quantlinear_wrong_in_features_is_named():
    q = QuantLinear.from_float(torch.nn.Linear(96, 16), bits=4, group_size=32)
    with pytest.raises(ValueError, match="in_features=96"):
        q(torch.randn(2, 95))


def test_quantized_model_casts_to_bfloat16():
    m = micro_llama()
    q = quantize_model(copy.deepcopy(m), {"bits": 4, "group_size": 32})
    ids = torch.randint(0, 128, (2, 9))
    ref = q(ids)
    qb = q.to(torch.bfloat16)
    layer = qb.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.scales.dtype == torch.float32 and layer.zeros.dtype == torch.float32
    out = qb(ids)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.parametrize("tie", [False, True])
def test_quantized_lm_head_when_not_skipped(tmp_path, tie):
    m = micro_llama(tie_word_embeddings=tie)
    q = quantize_model(copy.deepcopy(m), {"bits": 4, "group_size": 32, "modules_to_not_convert": []})
    assert isinstance(q.lm_head, QuantLinear)
    ids = torch.randint(0, 128, (2, 10))
    assert abs(q(ids, labels=ids).item() - m(ids, labels=ids).item()) < 0.05
    assert q.generate(ids[:1], 3, eos_token_id=[]).shape == (1, 13)
    q.save_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(Llama.from_pretrained(tmp_path / "q")(ids), q(ids))


def _quantize_cli(argv) -> int:
    from thrifty.quant import cli
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return cli.main(p.parse_args([str(a) for a in argv]))


def test_quantize_cli_output_loads_in_thrifty_llama(tmp_path):
    m = micro_llama(tie_word_embeddings=True)
    m.save_pretrained(tmp_path / "src")
    assert _quantize_cli([tmp_path / "src", tmp_path / "q", "--bits", "4", "--group-size", "32"]) == 0
    loaded = Llama.from_pretrained(tmp_path / "q")
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantLinear)
    want = quantize_model(copy.deepcopy(m), {"bits": 4, "group_size": 32})
    ids = torch.randint(0, 128, (1, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids), want(ids))
    # and a quantize_model result saves in the same format and comes back
    want.save_pretrained(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "thrifty" and cfg["quantization_config"]["bits"] == 4
    with torch.no_grad():
        assert torch.equal(Llama.from_pretrained(tmp_path / "again")(ids), want(ids))


def test_w8_configs_record_per_channel_and_act_order_only_for_gptq(tmp_path):
    """bits=8 is per output channel: config.json and the safetensors metadata say group_size -1 (the default
    128 was written there), and an RTN model does not claim act-order."""
    from safetensors import safe_open
    m = micro_llama(tie_word_embeddings=True)
    m.save_pretrained(tmp_path / "src")
    assert _quantize_cli([tmp_path / "src", tmp_path / "q8", "--bits", "8"]) == 0
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization_config"]["group_size"] == -1
    q = quantize_model(copy.deepcopy(m), {"bits": 8})
    q.save_pretrained(tmp_path / "api8")
    conf = json.loads((tmp_path / "api8" / "config.json").read_text())["quantization_config"]
    assert conf["group_size"] == -1 and conf["bits"] == 8
    with safe_open(str(tmp_path / "api8" / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["config"])
    assert meta["group_size"] == -1 and meta["act_order"] is False
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(Llama.from_pretrained(tmp_path / "api8")(ids), q(ids))
    q4 = quantize_model(copy.deepcopy(m), {"bits": 4, "group_size": 32})
    assert q4._thrifty_quant_config["group_size"] == 32 and q4._thrifty_quant_config["act_order"] is False


def test_quantize_cli_gptq_without_transformers(tmp_path, monkeypatch, capsys):
    from thrifty.data import save_tokenizer, train_tokenizer
    from thrifty.quant import cli

    tok = train_tokenizer([cli.DEFAULT_CORPUS] * 2, vocab_size=300)
    micro_llama(vocab_size=320).save_pretrained(tmp_path / "src")
    save_tokenizer(tok, tmp_path / "src")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    assert _quantize_cli([tmp_path / "src", tmp_path / "q", "--bits", "4", "--group-size", "32", "--method", "gptq",
                          "--calibration-tokens", "128", "--seq-len", "64"]) == 0
    layers = json.loads(thrifty.quant.model.read_metadata(str(tmp_path / "q" / "model.safetensors"))["layers"])
    assert layers["model.layers.0.self_attn.q_proj"]["act_order"]
    assert _quantize_cli([tmp_path / "src", tmp_path / "q2", "--method", "gptq", "--group-size", "32",
                          "--calibration", tmp_path / "missing.txt"]) == 2
    assert "--calibration" in capsys.readouterr().err and not (tmp_path / "q2").exists()


# ================= issue 6: the model =================
def test_forward_input_errors_name_the_argument():
    m = micro_llama()
    ids = torch.randint(0, 128, (2, 10))
    with pytest.raises(TypeError, match="input_ids"):
        m(ids.float())
    with pytest.raises(ValueError, match="labels"):
        m(ids, labels=ids[:, :5])
    with pytest.raises(ValueError, match="input_ids.*vocab_size=128"):
        m(ids + 128)
    with pytest.raises(IndexError):  # still an IndexError, as torch's embedding raises
        m(ids + 128)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(ids.reshape(-1), cu_seqlens=torch.tensor([0, 7, 19], dtype=torch.int32))


def test_forward_unbatched_ids_and_cu_seqlens_forms():
    m = micro_llama()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(m(ids[0]), m(ids[:1])[0])
        cu = torch.tensor([0, 7, 20], dtype=torch.int32)
        flat = ids.reshape(-1)
        ref = m(flat, cu_seqlens=cu)
        torch.testing.assert_close(m(flat, cu_seqlens=cu.long()), ref)
        torch.testing.assert_close(m(flat, cu_seqlens=cu, max_seqlen=13), ref)
        torch.testing.assert_close(ref[7:], m(flat[None, 7:])[0], rtol=1e-5, atol=1e-5)


def test_generate_bad_arguments():
    m = micro_llama()
    ids = torch.randint(0, 128, (1, 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(ids, -1)
    with pytest.raises(ValueError, match="top_p"):
        m.generate(ids, 2, 1.0, None, 1.5)
    with pytest.raises(TypeError, match="input_ids"):
        m.generate(ids.float(), 2)
    out = m.generate(ids, 3, 0.0, None, None, [])
    assert out.shape == (1, 7) and torch.equal(out[:, :4], ids)


def test_from_pretrained_dtype_names_and_missing_path(tmp_path):
    micro_llama().save_pretrained(tmp_path / "m")
    assert Llama.from_pretrained(tmp_path / "m", dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    assert Llama.from_pretrained(tmp_path / "m", torch_dtype=torch.float16).lm_head.weight.dtype == torch.float16
    assert Llama.from_pretrained(tmp_path / "m", dtype="auto").lm_head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        Llama.from_pretrained(tmp_path / "m", dtype="int7")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Llama.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama.from_pretrained(tmp_path / "empty")


def test_llama_config_hf_names(tmp_path):
    cfg = LlamaConfig(**MICRO, initializer_range=0.02, use_cache=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert cfg.rope_theta == 500000.0 and cfg.hidden_size == 64
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    cfg.save_pretrained(tmp_path / "c")
    back = LlamaConfig.from_pretrained(tmp_path / "c")
    assert back.rope_theta == 500000.0 and back.num_key_value_heads == 2
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaConfig(**MICRO, hidden_act="gelu", initializer_range=0.02)


def test_preset_constructors():
    assert LlamaConfig.from_preset("tiny") == LlamaConfig.preset("tiny")
    m = Llama.from_preset("tiny", vocab_size=256, num_hidden_layers=1)
    assert m.config.hidden_size == 256 and m.config.num_hidden_layers == 1
    assert 5e6 < Llama(LlamaConfig.preset("tiny")).num_params() < 20e6
    with pytest.raises(ValueError, match="unknown preset"):
        Llama.from_preset("huge")


def _hf_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg)  # left in training mode, as constructed


def test_patch_hf_training_forward_keeps_logits():
    ref = _hf_llama()
    patched = thrifty.patch_hf(copy.deepcopy(ref))
    ids = torch.randint(0, 96, (2, 12))
    want = ref(ids, labels=ids)
    got = patched(ids, labels=ids)
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * want.loss.item()
    assert got.logits is not None and got["logits"].shape == want.logits.shape
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    got.logits.float().pow(2).mean().backward()  # the lazily made logits carry autograd
    assert patched.model.embed_tokens.weight.grad is not None
    tup = patched(ids, labels=ids, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tup[1], want.logits, rtol=1e-4, atol=1e-4)


# ================= issue 7: training =================
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from thrifty.data import save_tokenizer, train_tokenizer
    d = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        (d / f"doc{i:02d}.txt").write_text(prose(i, 200))
    save_tokenizer(train_tokenizer([prose(i, 200) for i in range(24)], vocab_size=320), d / "tok")
    return d


TRAIN_MICRO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


@pytest.fixture(scope="module")
def base_model(corpus, tmp_path_factory):
    from thrifty.data import load_tokenizer, save_tokenizer
    torch.manual_seed(0)
    m = Llama(LlamaConfig(vocab_size=320, max_position_embeddings=128, eos_token_id=0, bos_token_id=0,
                          **TRAIN_MICRO)).init_weights()
    d = tmp_path_factory.mktemp("base")
    m.save_pretrained(d)
    save_tokenizer(load_tokenizer(corpus / "tok"), d)
    return d


def train_cfg(corpus, out, **kw):
    from thrifty.train import TrainConfig
    base = dict(data=str(corpus), tokenizer=str(corpus / "tok" / "tokenizer.json"), model_overrides=TRAIN_MICRO,
                batch_size=2, seq_len=32, steps=4, lr=3e-3, warmup=1, progress=False, precision="fp32", plot=False,
                eval_batches=2, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_every_metrics_row_has_step_loss_lr_tokens_per_s(corpus, tmp_path):
    from thrifty.train import Trainer
    out = tmp_path / "run"
    res = Trainer(train_cfg(corpus, out, steps=4, eval_every=2)).train()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert res["val_loss"] == rows[-1]["val_loss"]


def test_qlora_on_a_4bit_base(corpus, base_model, tmp_path):
    from safetensors.torch import load_file

    from thrifty.train import Trainer
    from thrifty.train.lora import LoRALinear

    out = tmp_path / "qlora"
    t = Trainer(train_cfg(corpus, out, model=str(base_model), model_overrides=None, lora_rank=4,
                          lora_targets="q_proj,v_proj", lora_base_bits=4, lora_group_size=32, steps=3, lr=5e-2))
    res = t.train()
    q = t.raw_model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, LoRALinear) and isinstance(q.base, QuantLinear) and q.base.bits == 4
    assert isinstance(t.raw_model.get_submodule("model.layers.0.mlp.up_proj"), QuantLinear)  # frozen, int4
    trainable = [n for n, p in t.raw_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert res["final_loss"] == res["final_loss"]  # finite
    # export: float Hugging Face names, dequantized base + B @ A, loadable by thrifty
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(base_model / "model.safetensors"))
    assert set(merged) == set(base)
    expect = q.base.dequantize() + q.scale * (q.lora_B.detach() @ q.lora_A.detach())
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expect, rtol=1e-6, atol=1e-6)
    m = Llama.from_pretrained(out)
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(m(ids), t.raw_model.eval()(ids), rtol=1e-4, atol=1e-4)


def test_trainer_takes_a_dict_or_keywords():
    from thrifty.train import Trainer
    assert Trainer({"steps": 3, "lora_rank": 2}).cfg.steps == 3
    assert Trainer(steps=5).cfg.steps == 5
    with pytest.raises(TypeError, match="unknown"):
        Trainer({"stepz": 3})
    with pytest.raises(TypeError, match="config"):
        Trainer("tiny")


def test_qlora_cli_flags():
    from thrifty.train import cli
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    c = cli.config_from_args(p.parse_args(["--lora-rank", "8", "--qlora", "--lora-targets", "q_proj,v_proj"]))
    assert c.lora_base_bits == 4 and c.lora_rank == 8 and c.lora_targets == ("q_proj", "v_proj")
    c = cli.config_from_args(p.parse_args(["--lora-rank", "8", "--lora-base-bits", "8"]))
    assert c.lora_base_bits == 8


def test_failed_start_in_existing_run_dir_leaves_it_as_it_was(corpus, tmp_path, capsys):
    from thrifty.train.cli import run
    small = tmp_path / "small_vocab"
    Llama(LlamaConfig(vocab_size=64, max_position_embeddings=128, **TRAIN_MICRO)).save_pretrained(small)
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run(train_cfg(corpus, out, model=str(small), model_overrides=None)) == 2
    assert "vocab mismatch" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # no tokenizer.json, no data/ cache left
    assert run(train_cfg(corpus, out, lora_base_bits=4)) == 2  # a quantized base without adapters
    assert "--lora-rank" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_python_dash_m_thrifty():
    import os
    env = {**os.environ, "PYTHONPATH": THRIFTY_PATH + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "thrifty", "train", "--help"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ("--data", "--preset", "--model", "--steps", "--time-budget", "--batch-size", "--seq-len", "--lr",
                 "--optimizer", "--lora-rank", "--lora-targets", "--out", "--save-every", "--resume", "--fsdp",
                 "--qlora"):
        assert flag in r.stdout, flag
