"""The public API exactly as issues 2 (foundation ops), 3 (attention) and 4 (optimizers) name it:
signatures, keyword-only markers, defaults, return types, drop-in behaviour next to the torch
counterpart (pickling, param groups, schedulers, state dicts) and the bad input that must raise.
CPU only, fast."""
from __future__ import annotations

import copy
import inspect
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import thrifty

OPTIMS = ["AdamW", "AdamW8bit", "Lion"]
PY_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _params(sig):
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


P, K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
E = inspect.Parameter.empty


# ---------------- signatures as the issues write them ----------------
@pytest.mark.parametrize("fn,expected", [
    ("thrifty.ops.rms_norm", [("x", P, E), ("weight", P, E), ("eps", P, 1e-6), ("residual", P, None)]),
    ("thrifty.ops.rotary_embedding", [("q", P, E), ("k", P, E), ("positions", P, E), ("cos_sin_cache", P, E),
                                      ("interleaved", P, False)]),
    ("thrifty.ops.swiglu", [("gate", P, E), ("up", P, E)]),
    ("thrifty.ops.flash_attention", [("q", P, E), ("k", P, E), ("v", P, E), ("causal", K, False),
                                     ("softmax_scale", K, None), ("window", K, (-1, -1)), ("softcap", K, 0.0),
                                     ("return_lse", K, False)]),
    ("thrifty.ops.flash_attention_varlen", [("q", P, E), ("k", P, E), ("v", P, E), ("cu_seqlens_q", P, E),
                                            ("cu_seqlens_k", P, E), ("max_seqlen_q", P, E), ("max_seqlen_k", P, E),
                                            ("causal", K, False), ("softmax_scale", K, None), ("window", K, (-1, -1)),
                                            ("softcap", K, 0.0), ("return_lse", K, False)]),
])
def test_op_signatures(fn, expected):
    obj = eval(fn)  # noqa: S307 (a fixed dotted name)
    assert _params(inspect.signature(obj)) == expected


def test_sdpa_signature_issue_order_plus_keyword_dropout():
    got = _params(inspect.signature(thrifty.nn.functional.scaled_dot_product_attention))
    names = [n for n, _, _ in got]
    # the issue's names and positional order, then torch's dropout_p accepted by keyword
    assert names[:7] == ["q", "k", "v", "attn_mask", "is_causal", "scale", "enable_gqa"]
    assert [d for _, _, d in got[3:7]] == [None, False, None, False]
    assert ("dropout_p", K, 0.0) in got


def test_sdpa_takes_the_issue_names_and_torch_names_by_keyword():
    sdpa = thrifty.nn.functional.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (5, 7, 7))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for out in (sdpa(q, k, v, is_causal=True), sdpa(q=q, k=k, v=v, is_causal=True),
                sdpa(query=q, key=k, value=v, is_causal=True), sdpa(q, key=k, value=v, is_causal=True)):
        torch.testing.assert_close(out, ref)
    with pytest.raises(TypeError, match="got both 'q' and its torch name 'query'"):
        sdpa(q=q, query=q, k=k, v=v)
    with pytest.raises(TypeError, match=r"^scaled_dot_product_attention\(\) got an unexpected keyword argument 'foo'"):
        sdpa(q, k, v, foo=1)


def test_cache_helper_signature():
    names = list(inspect.signature(thrifty.ops.build_rotary_cache).parameters)
    assert names[:4] == ["rotary_dim", "max_position", "base", "scaling"]


@pytest.mark.parametrize("cls,expected", [
    ("AdamW", [("lr", P, 1e-3), ("betas", P, (0.9, 0.999)), ("eps", P, 1e-8), ("weight_decay", P, 1e-2),
               ("master_weights", K, False), ("max_grad_norm", K, None)]),
    ("AdamW8bit", [("lr", P, 1e-3), ("betas", P, (0.9, 0.999)), ("eps", P, 1e-8), ("weight_decay", P, 1e-2),
                   ("master_weights", K, False), ("max_grad_norm", K, None)]),
    ("Lion", [("lr", P, 1e-4), ("betas", P, (0.9, 0.99)), ("weight_decay", P, 0.0)]),
])
def test_optimizer_signatures(cls, expected):
    opt_cls = getattr(thrifty.optim, cls)
    assert issubclass(opt_cls, torch.optim.Optimizer)
    got = _params(inspect.signature(opt_cls))
    assert got[0][0] == "params"
    for item in expected:
        assert item in got, f"{cls}: {item} not in {got}"


def test_module_signatures():
    assert _params(inspect.signature(thrifty.nn.RMSNorm))[:2] == [("hidden_size", P, E), ("eps", P, 1e-6)]
    assert _params(inspect.signature(thrifty.nn.SwiGLU))[:3] == [("hidden_size", P, E), ("intermediate_size", P, E),
                                                                  ("bias", P, False)]


# ---------------- return types ----------------
def test_return_types():
    x, w = torch.randn(3, 5, 16), torch.randn(16)
    assert isinstance(thrifty.ops.rms_norm(x, w), torch.Tensor)
    y, h = thrifty.ops.rms_norm(x, w, 1e-5, x)
    torch.testing.assert_close(h, x + x)
    cache = thrifty.ops.build_rotary_cache(8, 32)
    assert cache.shape == (32, 8) and cache.dtype == torch.float32
    q, k = torch.randn(4, 3, 16), torch.randn(4, 1, 16)
    q0, k0 = q.clone(), k.clone()
    out = thrifty.ops.rotary_embedding(q, k, torch.arange(4), cache)
    assert isinstance(out, tuple) and len(out) == 2 and out[1].shape == k.shape
    assert torch.equal(q, q0) and torch.equal(k, k0)
    qa, ka = torch.randn(2, 5, 4, 32), torch.randn(2, 7, 2, 32)
    assert isinstance(thrifty.ops.flash_attention(qa, ka, ka), torch.Tensor)
    o, lse = thrifty.ops.flash_attention(qa, ka, ka, causal=True, return_lse=True)
    assert o.shape == qa.shape and lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    with pytest.raises(TypeError):
        thrifty.ops.flash_attention(qa, ka, ka, True)  # keywords only


# ---------------- SDPA drop-in: torch's call unchanged ----------------
def test_sdpa_accepts_torch_dropout_keyword():
    q, k = torch.randn(2, 4, 7, 32), torch.randn(2, 4, 9, 32)
    sdpa = thrifty.nn.functional.scaled_dot_product_attention
    got = sdpa(q, k, k, attn_mask=None, dropout_p=0.0, is_causal=True)
    ref = F.scaled_dot_product_attention(q, k, k, attn_mask=None, dropout_p=0.0, is_causal=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa(q, k, k, dropout_p=0.1)


def test_sdpa_takes_torchs_positional_order_and_the_issues():
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 6, 16)
    sdpa = thrifty.nn.functional.scaled_dot_product_attention
    causal = F.scaled_dot_product_attention(q, k, k, is_causal=True)
    # torch's order (query, key, value, attn_mask, dropout_p, is_causal): a number in the 5th place is dropout_p
    for args in ((None, 0.0, True), (None, 0, True)):
        torch.testing.assert_close(sdpa(q, k, k, *args), causal, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa(q, k, k, None, 0.0, False, scale=0.3),
                               F.scaled_dot_product_attention(q, k, k, None, 0.0, False, scale=0.3), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa(q, k, k, None, 0.5, True)
    with pytest.raises(TypeError, match="both as the 5th positional argument"):
        sdpa(q, k, k, None, 0.0, dropout_p=0.0)
    torch.testing.assert_close(sdpa(q, k, k, None, torch.tensor(0.0), True), causal, atol=1e-5, rtol=1e-5)  # 0-d
    torch.testing.assert_close(sdpa(q, k, k, None, torch.tensor(True)), causal, atol=1e-5, rtol=1e-5)
    # the issue's order (q, k, v, attn_mask, is_causal, scale, enable_gqa): a bool in the 5th place is is_causal
    torch.testing.assert_close(sdpa(q, k, k, None, True), causal, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa(q, k, k, None, False, 0.3), F.scaled_dot_product_attention(q, k, k, scale=0.3),
                               atol=1e-5, rtol=1e-5)


def test_sdpa_broadcasts_batch_dims_like_torch():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 7, 32, generator=g, requires_grad=True)
    k = torch.randn(1, 4, 9, 32, generator=g, requires_grad=True)
    v = torch.randn(1, 4, 9, 32, generator=g, requires_grad=True)
    got = thrifty.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    go = torch.randn(ref.shape, generator=g)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="do not broadcast"):
        thrifty.nn.functional.scaled_dot_product_attention(q, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1))


# torch's SDPA takes 2-D (L, E) inputs and a value embedding Ev != E (the output then has Ev): so does the drop-in.
@pytest.mark.parametrize("qs,ks,vs", [((5, 16), (7, 16), (7, 16)), ((5, 16), (7, 16), (7, 24)),
                                      ((2, 3, 5, 16), (2, 3, 7, 16), (2, 3, 7, 8)),
                                      ((2, 4, 5, 16), (2, 2, 7, 16), (2, 2, 7, 40)), ((3, 5, 16), (3, 7, 16), (3, 7, 4))])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_2d_inputs_and_value_embedding_like_torch(qs, ks, vs, is_causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(*sh, dtype=torch.float64).float().requires_grad_() for sh in (qs, ks, vs))
    gqa = len(qs) == 4 and qs[1] != ks[1]
    out = thrifty.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qd, kd, vd, is_causal=is_causal, enable_gqa=gqa)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(g.float())
    ref.backward(g)
    for a, b in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(query=torch.randn(1, 2, 4, 16, dtype=torch.float64)), TypeError, "'query' must have dtype"),
    (dict(key=torch.randn(1, 2, 4, 16, dtype=torch.bfloat16)), TypeError, "one dtype"),
    (dict(value=torch.randn(1, 2, 5, 16)), ValueError, "same heads and length"),
    (dict(key=torch.randn(1, 2, 4, 8)), ValueError, "embedding size E"),
    (dict(value=torch.randn(1, 2, 4, 300)), ValueError, "head_dim"),
    (dict(attn_mask=torch.zeros(4, 4)), ValueError, "attn_mask cannot be fused"),
])
def test_sdpa_bad_input_names_the_argument(kw, exc, msg):
    args = dict(query=torch.randn(1, 2, 4, 16), key=torch.randn(1, 2, 4, 16), value=torch.randn(1, 2, 4, 16))
    args.update(kw)
    with pytest.raises(exc, match=msg):
        thrifty.nn.functional.scaled_dot_product_attention(**args)


def _meta(shape, meta, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta") if meta else torch.randn(shape).to(dtype)


# One argument on "meta" among CPU ones: the dispatcher picks the Meta kernel (the fake), which used to hand
# back uninitialised CPU tensors. Each op must refuse the mix by name; all-meta inputs still trace.
@pytest.mark.parametrize("name,call,arg", [
    ("rms_norm", lambda m: thrifty.ops.rms_norm(_meta((3, 8), False), _meta((8,), m)), "weight"),
    ("swiglu", lambda m: thrifty.ops.swiglu(_meta((3, 8), False), _meta((3, 8), m)), "up"),
    ("rotary", lambda m: thrifty.ops.rotary_embedding(_meta((4, 2, 16), False), _meta((4, 2, 16), False),
                                                      torch.zeros(4, dtype=torch.long, device="meta" if m else "cpu"),
                                                      thrifty.ops.build_rotary_cache(16, 8)), "positions"),
    ("flash_attention", lambda m: thrifty.ops.flash_attention(_meta((1, 4, 2, 16), False), _meta((1, 4, 2, 16), m),
                                                              _meta((1, 4, 2, 16), False)), "k"),
    ("quant_linear", lambda m: thrifty.ops.quant_linear(_meta((2, 64), False), _meta((8, 64), m, torch.int8),
                                                        _meta((8,), False), bits=8, group_size=64), "qweight"),
])
def test_meta_tensor_among_cpu_ones_is_refused(name, call, arg):
    with pytest.raises(ValueError, match=f"argument '{arg}' is on device meta but argument '.*' is on cpu"):
        call(True)
    out = call(False)
    assert all(t.device.type == "cpu" for t in (out if isinstance(out, tuple) else (out,)))


def test_all_meta_inputs_still_give_meta_outputs():
    q = torch.empty(1, 4, 2, 16, device="meta")
    assert thrifty.ops.flash_attention(q, q, q).device.type == "meta"
    assert thrifty.ops.rms_norm(torch.empty(3, 8, device="meta"), torch.empty(8, device="meta")).device.type == "meta"


# ---------------- optimizers: drop-in for torch.optim ----------------
def _model_and_opt(name, **kw):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 600), torch.nn.Linear(600, 4))  # 4800 weights: 8-bit state
    return m, getattr(thrifty.optim, name)(m.parameters(), **kw)


def _train(m, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        m(torch.randn(3, 8, generator=g)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("name", OPTIMS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_optimizer_copies_keep_stepping(name, how):
    m, opt = _model_and_opt(name, max_grad_norm=0.5)
    _train(m, opt, 2)
    opt2 = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert opt2.max_grad_norm == 0.5
    if name == "AdamW8bit":
        assert opt2.min_8bit_size == opt.min_8bit_size
    ps1 = [p for g in opt.param_groups for p in g["params"]]
    ps2 = [p for g in opt2.param_groups for p in g["params"]]
    assert all(a is not b and torch.equal(a, b) for a, b in zip(ps1, ps2))
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        for a, b in zip(ps1, ps2):
            grad = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        opt2.step()
    for a, b in zip(ps1, ps2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", OPTIMS)
def test_add_param_group_checks_hyperparameters_at_once(name):
    m, opt = _model_and_opt(name)
    n = len(opt.param_groups)
    with pytest.raises(ValueError, match="lr must be finite"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": float("nan")})
    assert len(opt.param_groups) == n  # the bad group is not left behind
    with pytest.raises(ValueError, match="weight_decay must be finite"):
        getattr(thrifty.optim, name)([{"params": [torch.nn.Parameter(torch.zeros(3))], "weight_decay": float("inf")}])
    p = torch.nn.Parameter(torch.ones(5))
    opt.add_param_group({"params": [p], "lr": 0.5})
    assert opt.param_groups[-1]["lr"] == 0.5 and opt.param_groups[-1]["betas"] == opt.defaults["betas"]
    p.grad = torch.ones(5)
    opt.step()
    assert (p < 1).all()


@pytest.mark.parametrize("name", OPTIMS)
@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_non_contiguous_params_step_like_contiguous_ones(name, layout):
    g = torch.Generator().manual_seed(3)
    if layout == "transposed":
        base = torch.randn(70, 90, generator=g)
        p = base.t().detach().requires_grad_()
    else:
        p = torch.randn(4, 3, 20, 20, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    assert not p.is_contiguous()
    q = p.detach().contiguous().requires_grad_()
    o1 = getattr(thrifty.optim, name)([p], lr=1e-2)  # 6300 / 4800 elements: 8-bit state for AdamW8bit
    o2 = getattr(thrifty.optim, name)([q], lr=1e-2)
    for _ in range(3):
        grad = torch.randn(p.shape, generator=g)
        p.grad, q.grad = grad.clone(), grad.clone()
        o1.step()
        o2.step()
    assert torch.equal(p.contiguous(), q)
    assert not p.is_contiguous()  # stepped in place: same tensor, same layout


@pytest.mark.parametrize("name", OPTIMS)
def test_schedulers_drive_lr(name):
    m, opt = _model_and_opt(name)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)  # cycles betas[0] too
    lrs = []
    for _ in range(5):
        _train(m, opt, 1)
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[-1] == sched.get_last_lr()[0] and len(set(lrs)) == 5
    assert opt.param_groups[0]["betas"][0] != 0.9 or name == "Lion"  # momentum cycled


def test_tensor_lr_with_scheduler():
    m, opt = _model_and_opt("AdamW", lr=torch.tensor(0.01))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        _train(m, opt, 1)
        sched.step()
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(0.0025)


def test_torch_adamw_state_dict_resumes_in_thrifty_master_weights():
    """A state dict written by torch.optim.AdamW (float32 moments, no masters) loads into thrifty's
    AdamW with master_weights on bfloat16 params: moments stay float32, masters are created."""
    torch.manual_seed(0)
    m = torch.nn.Linear(16, 8)
    ref = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(4, 16)).sum().backward()
    ref.step()
    mb = copy.deepcopy(m).bfloat16()
    opt = thrifty.optim.AdamW(mb.parameters(), lr=1e-2, master_weights=True)
    opt.load_state_dict(ref.state_dict())
    st = opt.state[mb.weight]
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    assert st["master"].dtype == torch.float32
    torch.testing.assert_close(st["exp_avg"], ref.state[m.weight]["exp_avg"])
    # old torch state dicts kept "step" as a number
    sd = copy.deepcopy(ref.state_dict())
    for s in sd["state"].values():
        s["step"] = int(s["step"].item())
    opt2 = thrifty.optim.AdamW(copy.deepcopy(m).parameters(), lr=1e-2)
    opt2.load_state_dict(sd)
    p = next(iter(opt2.param_groups[0]["params"]))
    p.grad = torch.ones_like(p)
    opt2.step()
    assert opt2.state[p]["step"].item() == 2


# ---------------- THRIFTY_CPU_ISA: a cap, not a demand ----------------
def _import_with_isa(level):
    return subprocess.run([sys.executable, "-c", "import thrifty; print(thrifty._C.cpu_isa())"],
                          env={**PY_ENV, "THRIFTY_CPU_ISA": level}, capture_output=True, text=True, timeout=120)


def test_isa_env_above_the_machine_lowers_nothing():
    # the highest level may be named on any machine: it caps, so the best level the machine has runs
    r = _import_with_isa("avx512_bf16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == thrifty._C.cpu_isa_detected()


def test_isa_env_unknown_name_says_what_to_set():
    r = _import_with_isa("avx9000")
    assert r.returncode != 0
    assert "avx9000" in r.stderr and "THRIFTY_CPU_ISA" in r.stderr
    assert "Rebuild" not in r.stderr  # the build is fine; the setting is not


# ---------------- modules: drop-in details ----------------
def test_rmsnorm_module_torch_conventions():
    m = thrifty.nn.RMSNorm(24)
    assert m.eps == 1e-6 and m.variance_epsilon == 1e-6 and m.normalized_shape == (24,)
    x = torch.randn(3, 24) * 1e-4  # small enough that eps matters
    ref = torch.nn.RMSNorm(24)  # eps=None: finfo(x.dtype).eps
    m_none = thrifty.nn.RMSNorm([24], eps=None)
    m_none.load_state_dict(ref.state_dict())
    torch.testing.assert_close(m_none(x), ref(x))
    for dt in (torch.bfloat16, torch.float16):  # eps=None in half precision: float32's epsilon, as torch's
        xh = (torch.randn(4, 24) * 1e-3).to(dt)
        torch.testing.assert_close(m_none.to(dt)(xh).float(), ref.to(dt)(xh).float(), rtol=1e-2, atol=1e-2)
    # torch's positional order: (normalized_shape, eps, elementwise_affine, device, dtype)
    plain = thrifty.nn.RMSNorm(24, 1e-5, False)
    assert plain.weight is None and plain.eps == 1e-5 and not plain.elementwise_affine
    assert thrifty.nn.RMSNorm(24, 1e-5, True, "cpu", torch.bfloat16).weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="last dim only"):
        thrifty.nn.RMSNorm((4, 6))
    y, h = m(x, x)  # the fused add + norm through the module
    torch.testing.assert_close(h, 2 * x)
