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


def _micro_hf(**kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return transformers, transformers.LlamaForCausalLM(cfg).eval()


def test_patch_hf_deepcopy_runs_its_own_weights():
    """The patched forwards used to hold the original modules' bound methods: a deepcopy (a reference or EMA
    model) ran the original's weights for its logits, padded path and generate."""
    transformers, hf = _micro_hf()
    thrifty.patch_hf(hf)
    twin = copy.deepcopy(hf)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    ref = transformers.LlamaForCausalLM(hf.config).eval()
    ref.load_state_dict(twin.state_dict())
    ids = torch.randint(0, 300, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(twin(ids, attention_mask=mask).logits[1], ref(ids, attention_mask=mask).logits[1],
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(twin(ids, labels=ids).loss, ref(ids, labels=ids).loss, atol=1e-5, rtol=1e-5)
        assert torch.equal(twin.generate(ids[:1], max_new_tokens=5, do_sample=False),
                           ref.generate(ids[:1], max_new_tokens=5, do_sample=False))
        assert not torch.allclose(hf(ids).logits, twin(ids).logits)  # the original keeps its own weights


def test_save_over_an_earlier_save_leaves_no_stale_weights(tmp_path):
    transformers, hf = _micro_hf()
    model = Llama(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).init_weights()
    x = torch.randint(0, 300, (1, 6))
    d = tmp_path / "m"
    model.save_pretrained(d, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.save_pretrained(d)  # unsharded over sharded: the old shards and index go
    assert sorted(f.name for f in d.glob("model*")) == ["model.safetensors"]
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_pretrained(d)(x), model(x))
        model.save_pretrained(d, max_shard_size="20KB")  # sharded over unsharded: model.safetensors goes
        assert not (d / "model.safetensors").exists()
        torch.testing.assert_close(transformers.AutoModelForCausalLM.from_pretrained(d)(x).logits, model(x),
                                   atol=1e-4, rtol=1e-4)
    # transformers saving sharded, then unsharded, into one folder keeps a stale index whose shards are gone;
    # model.safetensors is read first, as transformers reads it
    h = tmp_path / "h"
    hf.save_pretrained(h)
    (h / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}')
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_pretrained(h)(x), hf(x).logits, atol=1e-4, rtol=1e-4)


BASE_CFG = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)


@pytest.mark.parametrize("kw, named", [
    (dict(sliding_window=4), "'sliding_window' = 4 is not supported for llama"),
    (dict(model_type="qwen2", sliding_window=4), "'sliding_window' = 4 is not supported for qwen2"),
    (dict(model_type="mistral", attention_bias=True), "'attention_bias' = True is not supported for mistral"),
    (dict(model_type="mistral", mlp_bias=True), "'mlp_bias' = True is not supported for mistral"),
    (dict(model_type="qwen2", mlp_bias=True), "'mlp_bias' = True is not supported for qwen2"),
])
def test_config_refuses_what_its_architecture_cannot_save(kw, named):
    """Accepted before, then dropped by to_dict (a window on llama) or ignored by transformers (biases on
    mistral / qwen2): the reloaded model computed something else, with no error."""
    with pytest.raises(ValueError, match=named):
        LlamaConfig(**BASE_CFG, **kw)


def test_config_refuses_attention_dropout_and_counts_biases():
    with pytest.raises(ValueError, match="'attention_dropout' = 0.5"):
        LlamaConfig.from_dict({**BASE_CFG, "attention_dropout": 0.5})
    assert LlamaConfig.from_dict({**BASE_CFG, "attention_dropout": 0.0}).hidden_size == 64
    for kw in (dict(model_type="qwen2"), dict(attention_bias=True, mlp_bias=True), dict()):
        cfg = LlamaConfig(**BASE_CFG, **kw)
        assert cfg.num_params() == sum(p.numel() for p in Llama(cfg).parameters()), kw


# ---------------- patch_hf beside transformers' static cache, checkpointing, output views ----------------
def _tiny_hf(kind="llama", **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg_cls, model_cls = ((transformers.MistralConfig, transformers.MistralForCausalLM) if kind == "mistral" else
                          (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    cfg = cfg_cls(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, **kw)
    m = model_cls(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


def test_patch_hf_static_cache_keeps_logits_and_tokens():
    """A StaticCache (generate(cache_implementation="static"), the torch.compile path) hands back its whole
    buffer, empty slots included: thrifty's bottom-right causal attention let the queries see them (logits off
    by 144%, other tokens). Such layers now run transformers' attention (and its mask)."""
    transformers = pytest.importorskip("transformers")
    ref = _tiny_hf()
    pat = thrifty.patch_hf(copy.deepcopy(ref))
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        a = ref(ids, past_key_values=transformers.StaticCache(config=ref.config, max_cache_len=32), use_cache=True)
        b = pat(ids, past_key_values=transformers.StaticCache(config=pat.config, max_cache_len=32), use_cache=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    for impl in ("static", None):
        extra = {"cache_implementation": impl} if impl else {}
        assert torch.equal(pat.generate(ids, **kw, **extra), ref.generate(ids, **kw, **extra)), impl


@pytest.mark.parametrize("kind, kw", [("llama", dict(attn_implementation="eager")),
                                      ("mistral", dict(sliding_window=5))])
def test_patch_hf_gradient_checkpointing(monkeypatch, kind, kw):
    """gradient_checkpointing_enable() (use_reentrant=False): the recompute in the backward ran after the
    patched forward had returned, so it no longer knew the mask was the causal one, took transformers' path and
    failed torch's recompute check (CheckpointError). It now takes thrifty's path again, gradients as unpatched."""
    import thrifty.models.patch as P
    calls = []
    orig = P.attend
    monkeypatch.setattr(P, "attend", lambda *a, **k: calls.append(1) or orig(*a, **k))
    ref = _tiny_hf(kind, **kw).train()
    pat = thrifty.patch_hf(copy.deepcopy(ref))
    pat.gradient_checkpointing_enable()
    ids = torch.randint(0, 97, (2, 20))
    ref(ids, labels=ids).loss.backward()
    pat(ids, labels=ids).loss.backward()
    assert len(calls) == 2 * 2  # the forward and the recompute, two layers each
    for (n, a), (_, b) in zip(ref.named_parameters(), pat.named_parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-4 * a.grad.abs().max() + 1e-7, n
    # two forwards (and a no-grad one between) before one backward: each recompute still knows its own mask
    l1 = pat(ids, labels=ids).loss
    with torch.no_grad():
        pat(ids[:1])
    l2 = pat(ids.flip(0), labels=ids).loss
    (l1 + l2).backward()


def test_patch_hf_output_views_list_logits_and_attention_weights_fall_back():
    """With labels the patched output computes logits when read; its keys()/items() (what transformers.Trainer's
    prediction_step gathers) left them out. output_attentions=True returned no weights: such calls now run
    transformers' attention."""
    ref = _tiny_hf(attn_implementation="eager")
    pat = thrifty.patch_hf(copy.deepcopy(ref))
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        o0, o1 = ref(input_ids=ids, labels=ids), pat(input_ids=ids, labels=ids)
        assert "logits" in o1 and len(o1) == len(o0)
        assert list(o1.keys()) == list(o0.keys())
        torch.testing.assert_close(dict(o1.items())["logits"], o0.logits, rtol=1e-4, atol=1e-5)
        w0, w1 = ref(ids, output_attentions=True).attentions, pat(ids, output_attentions=True).attentions
    assert len(w1) == len(w0) == 2
    for a, b in zip(w0, w1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


# ---------------- torch.compile / torch.export with varying sequence lengths, patched models ----------------
def test_dynamic_sequence_length_compiles_once_and_exports():
    """flash_attention passed q.shape[1] into the op as an int, so every graph specialized to one sequence
    length: torch.export with a dynamic sequence Dim failed on Llama, and torch.compile recompiled per length
    (fullgraph failed at the recompile limit). Packed documents without max_seqlen compile too (they raised a
    data-dependent guard error)."""
    from torch._dynamo.testing import CompileCounter
    from torch.export import Dim
    cnt = CompileCounter()
    f = torch.compile(lambda q: thrifty.ops.flash_attention(q, q, q, causal=True), backend=cnt, dynamic=True,
                      fullgraph=True)
    for s in (5, 9, 17, 33):
        q = torch.randn(2, s, 4, 16)
        torch.testing.assert_close(f(q), thrifty.ops.flash_attention(q, q, q, causal=True))
    assert cnt.frame_count == 1
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = Llama(cfg).init_weights().eval()
    ep = torch.export.export(m, (torch.randint(0, 128, (2, 7)),), dynamic_shapes=({1: Dim("S", min=2, max=32)},))
    for s in (3, 13, 32):
        x = torch.randint(0, 128, (2, s))
        torch.testing.assert_close(ep.module()(x), m(x))
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)
    ids = torch.randint(0, 128, (13,))
    g = torch.compile(lambda i: m(i, cu_seqlens=cu), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(g(ids), m(ids, cu_seqlens=cu))


def test_varlen_max_seqlen_is_symbolic_under_compile():
    """max_seqlen_q/k were `int` in the op schema and int()-ed by the wrapper, so a dynamic-shape graph guarded
    on their values: a compiled serving step recompiled for every longest-cache length (fullgraph failed at the
    recompile limit), and Llama on packed documents for every token count. They are SymInt now, as in
    flash-attn's custom op."""
    from torch._dynamo.testing import CompileCounter
    cnt = CompileCounter()
    fav = thrifty.ops.flash_attention_varlen
    f = torch.compile(lambda q, k, cuq, cuk, mq, mk: fav(q, k, k, cuq, cuk, mq, mk, causal=True), backend=cnt,
                      dynamic=True, fullgraph=True)
    q, k = torch.randn(3, 4, 16), torch.randn(20, 2, 16)
    cuq, cuk = torch.arange(4, dtype=torch.int32), torch.tensor([0, 5, 10, 20], dtype=torch.int32)
    for mk in range(10, 21):  # past torch's recompile limit of 8
        torch.testing.assert_close(f(q, k, cuq, cuk, 1, mk), fav(q, k, k, cuq, cuk, 1, 10, causal=True))
    assert cnt.frame_count == 1
    g = torch.compile(lambda q, k, mk: fav(q, k, k, cuq, cuk, 1, mk, causal=True).sum(), dynamic=True,
                      fullgraph=True)  # inductor, forward and backward
    for mk in (10, 11, 12):
        q.grad = None
        q.requires_grad_()
        g(q, k, mk).backward()
        q2 = q.detach().requires_grad_()
        fav(q2, k, k, cuq, cuk, 1, mk, causal=True).sum().backward()
        torch.testing.assert_close(q.grad, q2.grad)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = Llama(cfg).init_weights().eval()
    cnt = CompileCounter()
    h = torch.compile(lambda i, cu: m(i, cu_seqlens=cu), backend=cnt, dynamic=True, fullgraph=True)
    for n in (20, 24, 28, 32):
        ids, cu = torch.randint(0, 128, (n,)), torch.tensor([0, 7, n], dtype=torch.int32)
        torch.testing.assert_close(h(ids, cu), m(ids, cu_seqlens=cu))
    assert cnt.frame_count == 1


@pytest.mark.parametrize("call", ["no_cache", "labels"])
def test_patch_hf_compiles_fullgraph(call):
    """A patched model under torch.compile(fullgraph=True): with a mask tensor built (use_cache=False) the
    remembered-mask dict broke the graph; with labels the lazy-logits output class could not be traced."""
    import io
    ref = _tiny_hf(attn_implementation="eager")
    pat = thrifty.patch_hf(copy.deepcopy(ref))
    ids = torch.randint(0, 97, (2, 9))
    kw = dict(use_cache=False) if call == "no_cache" else dict(labels=ids)
    with torch.no_grad():
        got = torch.compile(pat, fullgraph=True, backend="aot_eager")(input_ids=ids, **kw)
        want = ref(input_ids=ids, **kw)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    if call == "labels":
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.save(pat, io.BytesIO())  # the patched model still pickles
