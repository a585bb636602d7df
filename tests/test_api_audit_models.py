"""The model / serving side that issue 7's `thrifty generate` and `--model HF_DIR` stand on, as a transformers user
would check it: Llama.from_pretrained of a transformers-saved bfloat16 checkpoint (tied embeddings, GQA, llama3
rope scaling) against transformers' logits and greedy tokens, patch_hf under padding (loss, grads, left-padded
batched generate with the cache), and KV-cache decoding in chunks against a full recompute. Micro models, CPU."""
from __future__ import annotations

import copy

import pytest
import torch

import thrifty
from thrifty.models import KVCache, Llama, LlamaConfig

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=256, rope_scaling=LLAMA3, rope_theta=500000.0,
                                   initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path_factory.mktemp("hf_bf16")
    hf.to(torch.bfloat16).save_pretrained(d)
    return d


def test_from_pretrained_transformers_bf16_tied_gqa_llama3(hf_bf16):
    transformers = pytest.importorskip("transformers")
    m = Llama.from_pretrained(hf_bf16)  # the stored dtype is kept
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16 and m.cos_sin.dtype == torch.float32
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.config.rope_scaling["rope_type"] == "llama3" and m.config.rope_theta == 500000.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_bf16).eval()
    assert hf.dtype == torch.bfloat16
    x = torch.randint(0, 256, (2, 100))  # past original_max_position_embeddings: the scaled frequencies matter
    with torch.no_grad():
        ours, theirs = m(x).float(), hf(x).logits.float()
    assert (ours - theirs).abs().max() <= 0.02 * theirs.abs().max()  # bf16 rounding of two implementations
    m32 = Llama.from_pretrained(hf_bf16, dtype="float32")
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(hf_bf16, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = m32(x), hf32(x).logits
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4
        p = torch.randint(0, 256, (1, 7))
        g_ours = m32.generate(p, max_new_tokens=20, temperature=0, eos_token_id=[])
        g_theirs = hf32.generate(p, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(g_ours, g_theirs)


def test_patch_hf_padding_loss_grads_and_cached_generate(hf_bf16):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_bf16, dtype=torch.float32).eval()
    pat = thrifty.patch_hf(copy.deepcopy(ref))
    torch.manual_seed(1)
    x = torch.randint(1, 256, (2, 40))
    mask = torch.ones_like(x)
    mask[0, :9] = 0  # left padding on the first row
    labels = x.masked_fill(mask == 0, -100)
    outs = []
    for model in (ref, pat):
        model.zero_grad()
        o = model(x, attention_mask=mask, labels=labels)
        o.loss.backward()
        outs.append((o.loss.detach(), o.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, z0, g0), (l1, z1, g1) = outs
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    keep = mask.bool()
    torch.testing.assert_close(z1[keep], z0[keep], rtol=1e-4, atol=1e-4)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-5, msg=n)
    p = torch.randint(1, 256, (2, 9))
    am = torch.ones_like(p)
    p[0, :3], am[0, :3] = 0, 0
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(pat.generate(p, attention_mask=am, **kw), ref.generate(p, attention_mask=am, **kw))
        assert torch.equal(pat.generate(p[1:], **kw), ref.generate(p[1:], **kw))  # no padding: thrifty attention


@pytest.mark.parametrize("model_type, extra", [("mistral", dict(sliding_window=5)), ("qwen2", {}), ("llama", {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_chunks_and_generate_match_full_recompute(model_type, extra, dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, model_type=model_type, **extra)
    m = Llama(cfg).init_weights().to(dtype).eval()
    x = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        full = m(x).float()
        cache = KVCache(cfg.num_hidden_layers, 3, 20, cfg.num_key_value_heads, cfg.head_dim, dtype)
        parts = [m(x[:, :7], cache=cache).float()] + [m(x[:, i:i + 3], cache=cache).float() for i in range(7, 20, 3)]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (torch.cat(parts, 1) - full).abs().max() <= tol * full.abs().max()
        gen = m.generate(x[:, :6], max_new_tokens=10, temperature=0, eos_token_id=[])
        ids = x[:, :6]
        for _ in range(10):
            ids = torch.cat([ids, m(ids)[:, -1].float().argmax(-1, keepdim=True)], 1)
    if dtype == torch.float32:
        assert torch.equal(gen, ids)
    with pytest.raises(ValueError, match="cache length"):
        m(x[:, :1], cache=cache)  # the cache is full
