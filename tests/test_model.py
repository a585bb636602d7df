"""thrifty.models.Llama against Hugging Face transformers (skipped without it): checkpoints in and
out, logits (float32 and bfloat16), loss and gradients, greedy generation, packed documents,
the KV cache, patch_hf; config parsing and its errors; presets."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch

import thrifty
from thrifty.models import ConfigError, Llama, LlamaConfig, PRESETS
from reference import assert_close_to_ref

SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=211,
             max_position_embeddings=128)
# name -> (transformers config class, causal LM class, extra config fields)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, rope_theta=500000.0)),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32), max_position_embeddings=256)),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=6)),
}


def hf_model(name, seed=0):
    transformers = pytest.importorskip("transformers")
    cfg_cls, lm_cls, extra = CASES[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**{**SMALL, **extra}, attn_implementation="sdpa")
    model = getattr(transformers, lm_cls)(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    hf = hf_model(request.param)
    tmp = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(tmp / "hf")
    return request.param, hf, tmp


@pytest.fixture
def case(saved):
    name, hf, tmp = saved
    return name, copy.deepcopy(hf), tmp


def test_load_logits_float32(case):
    name, hf, tmp = case
    ours = Llama.from_pretrained(tmp / "hf", dtype=torch.float32)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 17))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) <= 1e-4


def test_loss_and_gradients(case):
    name, hf, tmp = case
    ours = Llama.from_pretrained(tmp / "hf", dtype=torch.float32).train()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 15))
    labels = ids.clone()
    labels[0, :4] = -100
    hf.train()
    l_hf = hf(ids, labels=labels).loss
    l_ours = ours(ids, labels=labels)
    assert abs(l_hf.item() - l_ours.item()) <= 1e-5 * abs(l_hf.item())
    l_hf.backward()
    l_ours.backward()
    ref = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        g, gr = p.grad, ref[n].grad
        assert (g - gr).abs().max().item() <= 1e-4 * gr.abs().max().item() + 1e-7, n


def test_greedy_generation_identical(case):
    name, hf, tmp = case
    ours = Llama.from_pretrained(tmp / "hf", dtype=torch.float32)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 7))
    want = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, max_new_tokens=12, temperature=0.0, eos_token_id=[])
    assert torch.equal(got, want)


def test_bfloat16_within_torch_error(case):
    name, hf, tmp = case
    ours = Llama.from_pretrained(tmp / "hf", dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 17))
    with torch.no_grad():
        ref = hf(ids).logits
        assert_close_to_ref(ours(ids), ref, hf16(ids).logits, factor=2.0, atol=1e-2, name="bf16 logits")


def test_save_then_transformers_loads(case):
    name, hf, tmp = case
    transformers = pytest.importorskip("transformers")
    ours = Llama.from_pretrained(tmp / "hf", dtype=torch.float32)
    ours.save_pretrained(tmp / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp / "ours", dtype=torch.float32).eval()
    assert type(back).__name__ == type(hf).__name__
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11))
    with torch.no_grad():
        assert rel_err(back(ids).logits, ours(ids)) <= 1e-4


def test_patch_hf_keeps_logits_and_gradients(case):
    name, hf, tmp = case
    patched = thrifty.patch_hf(copy.deepcopy(hf))
    ids = torch.randint(0, SMALL["vocab_size"], (2, 13))
    with torch.no_grad():
        assert rel_err(patched(ids).logits, hf(ids).logits) <= 1e-4
    hf.train()
    patched.train()
    l_ref, l_p = hf(ids, labels=ids).loss, patched(ids, labels=ids).loss
    assert abs(l_ref.item() - l_p.item()) <= 1e-5 * l_ref.item()
    l_ref.backward()
    l_p.backward()
    for (n, a), (_, b) in zip(hf.named_parameters(), patched.named_parameters()):
        assert (a.grad - b.grad).abs().max().item() <= 1e-4 * a.grad.abs().max().item() + 1e-7, n


def test_patch_hf_uses_thrifty_attention(monkeypatch):
    import thrifty.models.patch as P
    calls = []
    orig = P.attend
    monkeypatch.setattr(P, "attend", lambda *a, **k: calls.append(1) or orig(*a, **k))
    model = thrifty.patch_hf(hf_model("gqa"))
    model(torch.randint(0, SMALL["vocab_size"], (1, 9)))
    assert len(calls) == SMALL["num_hidden_layers"]
    with pytest.raises(TypeError, match="model must be one of"):
        thrifty.patch_hf(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["gqa", "mistral_window"])
def test_patch_hf_swaps_attention_under_causal_masks(monkeypatch, attn, name):
    """Masks transformers builds without padding (eager attention always builds one; a Mistral window
    shorter than the input too) are the plain (sliding-window) causal ones: thrifty attention runs, the
    logits and generate's tokens stay; a padded batch still runs transformers' own attention."""
    import thrifty.models.patch as P
    calls = []
    orig = P.attend
    monkeypatch.setattr(P, "attend", lambda *a, **k: calls.append(1) or orig(*a, **k))
    hf = hf_model(name)  # mistral_window: window 6 < 13 tokens
    hf.config._attn_implementation = attn
    patched = thrifty.patch_hf(copy.deepcopy(hf))
    ids = torch.randint(0, SMALL["vocab_size"], (2, 13))
    with torch.no_grad():
        assert rel_err(patched(ids).logits, hf(ids).logits) <= 1e-4
        assert len(calls) == SMALL["num_hidden_layers"]
        ones = torch.ones_like(ids)
        assert rel_err(patched(ids, attention_mask=ones).logits, hf(ids, attention_mask=ones).logits) <= 1e-4
        assert len(calls) == 2 * SMALL["num_hidden_layers"]
        pad = ones.clone()
        pad[0, :3] = 0
        assert rel_err(patched(ids, attention_mask=pad).logits[1], hf(ids, attention_mask=pad).logits[1]) <= 1e-4
        assert len(calls) == 2 * SMALL["num_hidden_layers"]  # padding: transformers' attention
        patched.model(ids)  # the inner model called directly: its mask is not known to be plain
        assert len(calls) == 2 * SMALL["num_hidden_layers"] + (SMALL["num_hidden_layers"] if attn == "sdpa" and
                                                                 name != "mistral_window" else 0)
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(patched.generate(ids[:1], **gen), hf.generate(ids[:1], **gen))


# ---- without transformers ----
def tiny(**kw):
    cfg = LlamaConfig(**{**SMALL, "num_key_value_heads": 2, **kw})
    torch.manual_seed(0)
    return Llama(cfg).init_weights(0.05).eval()


def test_kv_cache_decode_matches_full_forward():
    m = tiny()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 12))
    full = m(ids)
    from thrifty.models import KVCache
    cache = KVCache(2, 2, 16, 2, 16, torch.float32)
    steps = [m(ids[:, :8], cache=cache)] + [m(ids[:, i:i + 1], cache=cache) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type,window", [("llama", None), ("mistral", 6)])
def test_ragged_cache_mixes_prefill_chunks_and_decode(model_type, window):
    """The serving hook: packed queries (cu_seqlens) over a per-sequence cache, so one forward holds prefill
    chunks and decode steps of sequences with different cached lengths (the contiguous KVCache keeps one
    length per batch, and packed input with a cache was refused). Each step's logits equal a no-cache forward
    over that sequence's tokens so far."""
    from thrifty.models import KVCache, RaggedKVCache
    m = tiny(model_type=model_type, sliding_window=window)
    seqs = [torch.randint(0, SMALL["vocab_size"], (n,)) for n in (14, 6, 21)]
    cache = RaggedKVCache(2, 3, 24, 2, 16, torch.float32)
    done = [0, 0, 0]
    for step in [(5, 4, 0), (8, 0, 7), (1, 1, 13), (0, 1, 1)]:  # new tokens of each sequence
        ids = torch.cat([s[d:d + n] for s, d, n in zip(seqs, done, step)])
        cu = torch.tensor((0,) + step).cumsum(0).int()
        got = m(ids, cu_seqlens=cu, cache=cache)
        for s, d, n, g in zip(seqs, done, step, got.split(list(step))):
            if n:
                torch.testing.assert_close(g, m(s[None, :d + n])[0, d:], rtol=1e-5, atol=1e-5)
        done = [d + n for d, n in zip(done, step)]
        assert cache.lengths == done
    with pytest.raises(ValueError, match="exceed the cache length 24"):
        m(torch.zeros(11, dtype=torch.long), cu_seqlens=torch.tensor([0, 11, 11, 11], dtype=torch.int32), cache=cache)
    with pytest.raises(ValueError, match="batch \\+ 1 = 4 offsets"):
        m(seqs[0][:2], cu_seqlens=torch.tensor([0, 2], dtype=torch.int32), cache=cache)
    with pytest.raises(ValueError, match="1-D integer offsets"):
        cache.update_varlen(0, torch.zeros(2, 2, 16), torch.zeros(2, 2, 16), torch.tensor([0, 2, 2, 2.5]))
    with pytest.raises(ValueError, match="never decrease"):
        m(seqs[0][:4], cu_seqlens=torch.tensor([0, 3, 2, 4], dtype=torch.int32), cache=cache)
    with pytest.raises(ValueError, match="bfloat16 as the cache holds"):
        m(seqs[0][:2], cu_seqlens=torch.tensor([0, 2, 2, 2], dtype=torch.int32),
          cache=RaggedKVCache(2, 3, 24, 2, 16, torch.bfloat16))
    with pytest.raises(ValueError, match="RaggedKVCache"):  # a one-length cache cannot take packed input
        m(seqs[0][:2], cu_seqlens=torch.tensor([0, 2], dtype=torch.int32), cache=KVCache(2, 1, 8, 2, 16, torch.float32))


def test_packed_documents_match_separate():
    m = tiny()
    a, b = torch.randint(0, SMALL["vocab_size"], (7,)), torch.randint(0, SMALL["vocab_size"], (5,))
    cu = torch.tensor([0, 7, 12], dtype=torch.int32)
    packed = m(torch.cat([a, b]), cu_seqlens=cu)
    torch.testing.assert_close(packed, torch.cat([m(a[None])[0], m(b[None])[0]]), rtol=1e-5, atol=1e-5)
    loss = m(torch.cat([a, b]), labels=torch.cat([a, b]), cu_seqlens=cu)
    la, lb = m(a[None], labels=a[None]), m(b[None], labels=b[None])
    torch.testing.assert_close(loss, (la * 6 + lb * 4) / 10)
    # cu_seqlens as a plain list, with labels too
    torch.testing.assert_close(m(torch.cat([a, b]), labels=torch.cat([a, b]), cu_seqlens=[0, 7, 12]), loss)


def test_sampling_and_eos():
    m = tiny()
    ids = torch.randint(0, SMALL["vocab_size"], (3, 4))
    g = torch.Generator().manual_seed(0)
    out = m.generate(ids, max_new_tokens=5, temperature=0.8, top_k=20, top_p=0.9, generator=g)
    assert out.shape == (3, 9) and torch.equal(out[:, :4], ids)
    first = m.generate(ids[:1], max_new_tokens=1)[0, -1].item()
    stop = m.generate(ids[:1], max_new_tokens=10, eos_token_id=first)
    assert stop.shape == (1, 5)


def test_sharded_round_trip(tmp_path):
    m = tiny(tie_word_embeddings=False)
    m.save_pretrained(tmp_path, max_shard_size=40_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    back = Llama.from_pretrained(tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 9))
    torch.testing.assert_close(back(ids), m(ids))


def _write_cfg(tmp_path, **fields):
    base = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **SMALL}
    (tmp_path / "config.json").write_text(json.dumps({**base, **fields}))
    return LlamaConfig.from_json(tmp_path)


def test_config_old_and_new_rope_fields(tmp_path):
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
    old = _write_cfg(tmp_path, rope_theta=5e5, rope_scaling={"type": "llama3", **scaling})
    new = _write_cfg(tmp_path, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **scaling})
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.rope_scaling == new.rope_scaling == {"rope_type": "llama3", **scaling}
    plain = _write_cfg(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None
    d = new.to_dict()
    assert d["rope_parameters"]["rope_type"] == "llama3" and d["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("fields,match", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "'model_type' = 'gpt2'"),
    (dict(architectures=["LlamaForSequenceClassification"]), "'architectures'"),
    (dict(hidden_act="gelu"), "'hidden_act' = 'gelu'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope_type 'yarn'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type 'dynamic'"),
    (dict(num_key_value_heads=3), "'num_key_value_heads' = 3"),
    (dict(quantization_config={"quant_method": "gptq"}), "'quantization_config'"),
    (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=True), "'use_sliding_window'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks 'low_freq_factor'"),
    # sizes: positive integers (0 heads used to raise ZeroDivisionError)
    (dict(num_key_value_heads=0), "'num_key_value_heads' = 0 must be a positive integer"),
    (dict(num_attention_heads=0), "'num_attention_heads' = 0 must be a positive integer"),
    (dict(num_attention_heads=-4), "'num_attention_heads' = -4"),
    (dict(hidden_size=0), "'hidden_size' = 0"),
    (dict(head_dim=0), "'head_dim' = 0"),
    (dict(num_hidden_layers=2.5), "'num_hidden_layers' = 2.5"),
    (dict(vocab_size=True), "'vocab_size' = True"),
    (dict(intermediate_size=-1), "'intermediate_size' = -1"),
    (dict(max_position_embeddings=0), "'max_position_embeddings' = 0"),
    (dict(hidden_size=2), "'hidden_size' = 2 is smaller than num_attention_heads"),
    # numbers and flags a wrong config.json carried into the model unnoticed
    (dict(rope_theta=-1), r"'rope_theta' = -1.0 must be a finite number > 0"),
    (dict(rms_norm_eps="1e-5"), r"'rms_norm_eps' = '1e-5' must be a finite number > 0"),
    (dict(tie_word_embeddings="yes"), r"'tie_word_embeddings' = 'yes' must be true or false"),
    (dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=0),
     r"'sliding_window' = 0 must be a positive integer or null"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0}), r"\(linear\) has factor 0"),
])
def test_config_errors_name_the_field(tmp_path, fields, match):
    with pytest.raises(ConfigError, match=match):
        _write_cfg(tmp_path, **fields)


def test_presets():
    assert set(PRESETS) >= {"tiny", "small"}
    t, s = LlamaConfig.preset("tiny"), LlamaConfig.preset("small")
    assert 8e6 <= t.num_params() <= 13e6
    assert 110e6 <= s.num_params() <= 140e6
    with torch.device("meta"):
        assert Llama(t).num_params() == t.num_params()
        assert Llama(s).num_params() == s.num_params()
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        LlamaConfig.preset("huge")


def test_to_bfloat16_keeps_float32_rotary_cache():
    m = tiny().to(torch.bfloat16)
    assert m.cos_sin.dtype == torch.float32 and m.lm_head.weight.dtype == torch.bfloat16
    assert m.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2).shape == (1, 5)


def test_generate_too_long_is_an_error():
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        tiny().generate(torch.zeros(1, 100, dtype=torch.long), max_new_tokens=100)
    m = tiny()  # max_position_embeddings 128: the last new token is sampled, never fed back
    assert m.generate(torch.zeros(1, 128, dtype=torch.long), max_new_tokens=1).shape == (1, 129)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        m.generate(torch.zeros(1, 128, dtype=torch.long), max_new_tokens=2)


def test_generate_returns_a_plain_tensor_and_takes_real_numbers():
    """The ids came back as an inference tensor: scoring the samples with gradients (RL, distillation) or editing
    them in place failed. numpy floats and 0-d tensors were refused as temperature / top_p."""
    import numpy as np

    m = tiny()
    out = m.generate(torch.randint(3, 100, (2, 6)), max_new_tokens=3)
    assert not out.is_inference()
    out[0, 0] = 1
    m(out, labels=out).backward()
    with torch.inference_mode():  # inside inference mode the caller gets what it asked for
        assert m.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2).is_inference()
    torch.manual_seed(0)
    a = m.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4, temperature=np.float32(0.7),
                   top_p=torch.tensor(0.9))
    torch.manual_seed(0)
    b = m.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4, temperature=0.7, top_p=0.9)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="'temperature' must be a real number >= 0"):
        m.generate(torch.zeros(1, 3, dtype=torch.long), temperature=True)


# ---- audit findings ----
def test_patch_hf_bfloat16_loss_is_float32():
    """transformers' own loss upcasts the logits (a float32 loss for a bfloat16 model), and so does
    thrifty's Llama: the patched model's fused loss too, also with num_items_in_batch."""
    hf = hf_model("gqa").to(torch.bfloat16)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 13))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels).loss
        ref_sum = hf(ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss
        patched = thrifty.patch_hf(hf)
        got = patched(ids, labels=labels).loss
        got_sum = patched(ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss
    assert ref.dtype == torch.float32 and got.dtype == torch.float32 and got_sum.dtype == torch.float32
    assert abs(got.item() - ref.item()) <= 1e-2 * ref.item()
    assert abs(got_sum.item() - ref_sum.item()) <= 1e-2 * ref_sum.item()


def test_packed_logits_keep_the_input_shape():
    m = tiny()
    ids = torch.randint(0, SMALL["vocab_size"], (1, 12))
    cu = torch.tensor([0, 7, 12], dtype=torch.int32)
    batched, flat = m(ids, cu_seqlens=cu), m(ids[0], cu_seqlens=cu)
    assert batched.shape == (1, 12, SMALL["vocab_size"]) and flat.shape == (12, SMALL["vocab_size"])
    torch.testing.assert_close(batched[0], flat)
    assert m.hidden_states(ids, cu_seqlens=cu).shape == (1, 12, SMALL["hidden_size"])
    # the loss of a (1, tokens) packed batch is the flat one's (the trainer passes flat tokens)
    torch.testing.assert_close(m(ids, labels=ids, cu_seqlens=cu), m(ids[0], labels=ids[0], cu_seqlens=cu))


def test_max_shard_size_strings_as_transformers(tmp_path):
    """KB/MB/GB powers of 1000, KiB/MiB/GiB of 1024, as transformers' save_pretrained reads them."""
    import numpy as np
    from thrifty.models.hf import save_pretrained
    m = tiny(tie_word_embeddings=False)
    m.save_pretrained(tmp_path / "kb", max_shard_size="20KB")
    index = json.loads((tmp_path / "kb" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    save_pretrained(m, tmp_path / "fn", max_shard_size="40KB")
    assert (tmp_path / "fn" / "model.safetensors.index.json").exists()
    ids = torch.randint(0, SMALL["vocab_size"], (1, 9))
    torch.testing.assert_close(Llama.from_pretrained(tmp_path / "kb")(ids), m(ids))
    for bad in (0, -5, "lots", "0KB", "-5KB", "20", True, 2.5):
        with pytest.raises(ValueError, match="'max_shard_size'"):
            m.save_pretrained(tmp_path / "bad", max_shard_size=bad)
    assert not (tmp_path / "bad").exists()
    from thrifty.models.hf import parse_shard_size
    assert parse_shard_size("20KB") == 20_000 and parse_shard_size("500MB") == 500 * 10 ** 6
    assert parse_shard_size("5GB") == 5 * 10 ** 9 and parse_shard_size("1.5gb") == 1_500_000_000
    assert parse_shard_size("20KiB") == 20 * 1024 and parse_shard_size("2GiB") == 2 * 2 ** 30
    assert parse_shard_size(40_000) == 40_000 and parse_shard_size(np.int64(40_000)) == 40_000
    assert parse_shard_size(None) is None


def test_generate_keeps_int32_and_takes_numpy_and_0d_tensor_ints():
    import numpy as np
    m = tiny()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 5))
    want = m.generate(ids, max_new_tokens=4, eos_token_id=[])
    got = m.generate(ids.int(), max_new_tokens=4, eos_token_id=[])
    assert want.dtype == torch.int64 and got.dtype == torch.int32 and torch.equal(got.long(), want)
    assert m.generate(ids[0].int(), max_new_tokens=2, eos_token_id=[]).dtype == torch.int32
    assert torch.equal(m.generate(ids, max_new_tokens=np.int64(4), eos_token_id=[]), want)
    assert torch.equal(m.generate(ids, max_new_tokens=torch.tensor(4), eos_token_id=[]), want)
    first = want[0, 5].item()
    for eos in (np.int32(first), torch.tensor(first), [np.int64(first)], torch.tensor([first])):
        assert torch.equal(m.generate(ids[:1], max_new_tokens=4, eos_token_id=eos), want[:1, :6])
    g = torch.Generator().manual_seed(0)
    a = m.generate(ids, max_new_tokens=3, temperature=1.0, top_k=np.int64(5), generator=g)
    g.manual_seed(0)
    assert torch.equal(a, m.generate(ids, max_new_tokens=3, temperature=1.0, top_k=torch.tensor(5), generator=g))
    for kw, name in ((dict(max_new_tokens=True), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
                     (dict(max_new_tokens=torch.tensor(2.0)), "max_new_tokens"),
                     (dict(max_new_tokens=torch.tensor(True)), "max_new_tokens"),
                     (dict(top_k=np.bool_(True)), "top_k"), (dict(top_k=3.0), "top_k"),
                     (dict(eos_token_id=2.5), "eos_token_id"), (dict(eos_token_id=[2, True]), "eos_token_id")):
        with pytest.raises(ValueError, match=f"argument '{name}'"):
            m.generate(ids, **kw)


def test_quantized_checkpoint_format_version_is_checked(tmp_path):
    from thrifty.quant import quantize_model
    from thrifty.quant.formats import FORMAT_VERSION
    m = quantize_model(tiny(tie_word_embeddings=False), {"bits": 8})
    m.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["quantization_config"]["format_version"] == FORMAT_VERSION
    ids = torch.randint(0, SMALL["vocab_size"], (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_pretrained(tmp_path)(ids), m(ids))
    for bad in (FORMAT_VERSION + 1, 0, "1", None):
        conf["quantization_config"]["format_version"] = bad
        (tmp_path / "config.json").write_text(json.dumps(conf))
        with pytest.raises(ValueError, match="config.json.*format_version = .*supported.*versions 1") as err:
            Llama.from_pretrained(tmp_path)
        assert repr(bad) in str(err.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_checkpoint_layers_take_the_model_dtype(tmp_path, dtype):
    """The reloaded QuantLinears' dequantized .weight (and bias) follow the model's dtype as before saving
    (weight_dtype came back float32 in a bf16 model: the layers were built without a dtype)."""
    from thrifty.nn import QuantLinear
    from thrifty.quant import quantize_model
    m = quantize_model(tiny().to(dtype), {"bits": 4, "group_size": 32})
    m.save_pretrained(tmp_path)
    for load_dtype in (None, dtype):
        r = Llama.from_pretrained(tmp_path, dtype=load_dtype)
        layers = [mod for mod in r.modules() if isinstance(mod, QuantLinear)]
        assert layers and all(mod.weight.dtype == dtype for mod in layers)
        ids = torch.randint(0, SMALL["vocab_size"], (1, 7))
        with torch.no_grad():
            assert torch.equal(r(ids), m(ids))
    r = Llama.from_pretrained(tmp_path, dtype=torch.float32)
    assert all(mod.weight.dtype == torch.float32 for mod in r.modules() if isinstance(mod, QuantLinear))


@pytest.mark.parametrize("shape", [(2, 0), (0,), (0, 5)])
def test_empty_input_is_a_value_error(shape):
    m = tiny()
    with pytest.raises(ValueError, match=rf"'input_ids'.*{re.escape(str(shape))}"):
        m(torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"'input_ids'.*{re.escape(str(shape))}"):
        m(torch.zeros(shape, dtype=torch.long), labels=torch.zeros(shape, dtype=torch.long))


def test_meta_device_build_then_to_empty_rebuilds_the_rotary_cache():
    """A Llama built on the meta device (FSDP2 / torchtitan recipes), moved with to_empty() and loaded or
    initialised gave NaN logits: the rotary cache is a non-persistent buffer, left as uninitialised memory."""
    ref = tiny()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9))
    with torch.device("meta"):
        m = Llama(ref.config)
    m.to_empty(device="cpu")
    m.load_state_dict(ref.state_dict())
    torch.testing.assert_close(m(ids), ref(ids))
    m2 = Llama(ref.config).to("meta").to_empty(device="cpu").init_weights()
    torch.testing.assert_close(m2.cos_sin, ref.cos_sin)


def test_to_empty_keeps_a_tied_lm_head_and_computes_the_rotary_cache():
    """to_empty() gave the tied LM head its own tensor (trained apart, lost on save), and on a model whose
    buffers were real (accelerate's init_empty_weights) left the rotary cache uninitialised."""
    ref = tiny(tie_word_embeddings=True)
    with torch.device("meta"):
        m = Llama(ref.config)
    m.to_empty(device="cpu").init_weights()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters())
    m2 = tiny()
    m2.cos_sin.fill_(float("nan"))
    m2.to_empty(device="cpu")
    torch.testing.assert_close(m2.cos_sin, ref.cos_sin)
