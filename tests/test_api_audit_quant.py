"""Issue 5 (quantization) audited as an outside user of bitsandbytes / AutoGPTQ / AWQ would: QuantLinear
(from_float RTN and GPTQ, from_gptq, from_awq, dequantize), quantize_model with its config, save / load,
SmoothQuant folding, odd shapes, output dtypes, dtype casts and copies, and bad input that must raise
clearly (and before anything is changed). CPU only, a few seconds."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import thrifty
from thrifty.nn import QuantLinear
from thrifty.quant import QuantConfig, gptq_quantize, load_quantized, quantize_model, save_quantized, smooth_fold
from thrifty.quant import formats as F


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


# ---------------- odd shapes against the float64 reference of the layer's own weights ----------------
@pytest.mark.parametrize("bits,g,k,n", [(4, 32, 96, 13), (4, 64, 192, 7), (4, 32, 32, 1), (4, 256, 256, 9),
                                        (8, 128, 13, 5), (8, 128, 1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_odd_shapes_all_dtypes_match_float64_of_dequantized(bits, g, k, n, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    q = QuantLinear.from_float(lin, bits=bits, group_size=g)
    w = q.dequantize()
    assert w.dtype == torch.float32 and w.shape == (n, k)
    for m in (1, 5, 70):
        x = torch.randn(2, m, k).to(dtype)
        y = q(x)
        assert y.dtype == dtype and y.shape == (2, m, n)
        ref = x.double() @ w.double().t() + lin.bias.double()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert _rel(y, ref) < tol


# ---------------- quantize_model config (defect: skip=None was a bare TypeError) ----------------
def test_quant_config_skip_none_quantizes_every_linear():
    assert QuantConfig(skip=None).skip == ()
    assert QuantConfig(skip="head").skip == ("head",)
    with pytest.raises(TypeError, match="skip"):
        QuantConfig(skip=3)
    with pytest.raises(ValueError, match="damp"):
        QuantConfig(damp=float("nan"))
    m = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    m.lm_head = nn.Linear(8, 8)
    quantize_model(m, QuantConfig(bits=8, skip=None))
    assert isinstance(m.lm_head, QuantLinear) and isinstance(m[0], QuantLinear)


# ---------------- a Linear shared by two parents (defect: only one name was quantized) ----------------
class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(64, 64)
        self.dec = self.enc  # one layer reachable under two names (weight sharing by module)
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        return self.out(self.dec(torch.relu(self.enc(x))))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_shared_linear_is_quantized_under_every_name_and_round_trips(tmp_path, method):
    torch.manual_seed(0)
    model = _Shared()
    fresh = copy.deepcopy(model)
    quantize_model(model, {"bits": 4, "group_size": 32, "method": method, "skip": ()},
                   calibration=torch.randn(64, 64) if method == "gptq" else None)
    assert isinstance(model.enc, QuantLinear) and model.dec is model.enc
    x = torch.randn(3, 64)
    y = model(x)
    path = str(tmp_path / "m.safetensors")
    save_quantized(model, path)
    loaded = load_quantized(fresh, path)
    assert isinstance(loaded.enc, QuantLinear) and loaded.dec is loaded.enc
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)


def test_shared_linear_skipped_under_any_of_its_names():
    model = _Shared()
    quantize_model(model, {"bits": 8, "skip": ("dec",)})
    assert type(model.enc) is nn.Linear and model.dec is model.enc and isinstance(model.out, QuantLinear)


# ---------------- from_float input checks (defect: raw torch errors, or silent garbage) ----------------
LIN = nn.Linear(128, 24)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(method="gptq", calibration=[[1.0] * 128]), TypeError, "calibration"),
    (dict(method="gptq", calibration=torch.ones(4, 128, dtype=torch.int64)), TypeError, "calibration"),
    (dict(method="gptq", calibration=torch.full((8, 128), float("nan"))), ValueError, "inf or nan"),
    (dict(method="gptq", calibration=torch.zeros(0, 128)), ValueError, "no tokens"),
    (dict(method="gptq", calibration=torch.randn(8, 64)), ValueError, "in_features=128"),
    (dict(method="gptq", calibration=torch.randn(8, 128), damp=-1.0), ValueError, "damp"),
    (dict(smooth=torch.ones(64)), ValueError, "smooth"),
    (dict(smooth=torch.zeros(128)), ValueError, "smooth"),
    (dict(smooth=[1.0] * 128), TypeError, "smooth"),
])
def test_from_float_bad_calibration_damp_smooth(kw, exc, match):
    with pytest.raises(exc, match=match):
        QuantLinear.from_float(LIN, bits=4, group_size=32, **kw)


def test_gptq_quantize_bad_hessian_and_damp():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    x = torch.randn(3, 64).double()  # rank 3: positive definite only once damped
    h = 2 * x.t() @ x / 3
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, h, group_size=32, damp=float("inf"))
    with pytest.raises(ValueError, match="inf or nan"):
        gptq_quantize(w, torch.full((64, 64), float("nan")), group_size=32)
    with pytest.raises(torch.linalg.LinAlgError, match="raise damp"):
        gptq_quantize(w, h, group_size=32, damp=0.0)
    q, s, z, perm = gptq_quantize(w, h, group_size=32, damp=0.01)
    assert q.shape == (8, 64) and s.shape == (8, 2) and perm.shape == (64,)


def test_quantize_model_gptq_nonfinite_calibration_names_the_layer():
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(16, 64)
    x[3, 5] = float("inf")
    with pytest.raises(ValueError, match="'0'.*inf or nan"):
        quantize_model(m, {"bits": 4, "group_size": 32, "method": "gptq", "skip": ()}, calibration=x)
    assert type(m[0]) is nn.Linear  # nothing replaced


# ---------------- smooth_fold checks everything before changing the model ----------------
def test_smooth_fold_bad_input_raises_and_leaves_the_model_alone():
    torch.manual_seed(0)
    norm, a, b = nn.LayerNorm(64), nn.Linear(64, 32), nn.Linear(64, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    before = [t.detach().clone() for t in (norm.weight, a.weight, b.weight)]
    for args, exc in [((norm, [a, b], torch.ones(32)), ValueError),          # act_absmax shape
                      ((nn.LayerNorm(32), [a, b], torch.ones(64)), ValueError),  # prev size
                      ((norm, [a, nn.Linear(32, 4)], torch.ones(64)), ValueError),  # linears disagree
                      ((norm, [], torch.ones(64)), TypeError),
                      ((norm, [a], torch.ones(64), 1.5), ValueError)]:          # alpha
        with pytest.raises(exc, match="smooth_fold"):
            smooth_fold(*args)
    for t, old in zip((norm.weight, a.weight, b.weight), before):
        assert torch.equal(t, old)
    # the good call keeps the float function and accepts a single Linear too
    x = torch.randn(5, 64)
    y = a(norm(x))
    smooth_fold(norm, a, x.abs().amax(0))
    torch.testing.assert_close(a(norm(x)), y, rtol=1e-4, atol=1e-5)


# ---------------- dtype casts, copies, state dicts of a quantized model ----------------
@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_cast_copy_pickle_and_state_dict_of_a_quantized_model(cast):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))  # noqa: E731
    m = quantize_model(make(), {"bits": 4, "group_size": 32, "skip": ()})
    getattr(m, cast)()
    dt = torch.float16 if cast == "half" else torch.bfloat16
    assert m[0].scales.dtype == torch.float32 and m[0].zeros.dtype == torch.float32  # format kept
    assert m[0].bias.dtype == dt and m[0].weight.dtype == dt
    x = torch.randn(3, 64, dtype=dt)
    y = m(x)
    assert y.dtype == dt
    for other in (copy.deepcopy(m), _pickled(m)):
        torch.testing.assert_close(other(x), y, rtol=0, atol=0)
    sd = m.state_dict()
    fresh = getattr(quantize_model(make(), {"bits": 4, "group_size": 32, "skip": ()}), cast)()
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)


def _pickled(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ---------------- importers through the constructors, odd group counts ----------------
@pytest.mark.parametrize("k,n,g", [(96, 16, 32), (192, 8, 64)])
def test_gptq_and_awq_imports_through_quantlinear(k, n, g):
    torch.manual_seed(0)
    q = torch.randint(0, 15, (k, n))  # codes 0..14, so that q + 1 fits a nibble
    z = torch.randint(0, 16, (k // g, n))
    s = torch.rand(k // g, n) / 10 + 0.01
    bias = torch.randn(n, dtype=torch.float16)
    # GPTQ zero points lie in [1, 16] (stored minus one), AWQ's in [0, 15]: the same weights either way
    qw, qz, sc = F.to_gptq_tensors(q + 1, z + 1, s)
    lg = QuantLinear.from_gptq(qw, qz, sc, bias=bias)
    qw2, qz2, sc2 = F.to_awq_tensors(q, z, s)
    la = QuantLinear.from_awq(qw2, qz2, sc2, bias=bias, group_size=g)
    ref = ((q.float() - z.repeat_interleave(g, 0).float()) * sc.float().repeat_interleave(g, 0)).t()
    assert torch.equal(lg.dequantize(), ref) and torch.equal(la.dequantize(), ref)
    assert torch.equal(lg.dequantize(), F.gptq_dequantize_reference(qw, qz, sc))
    assert torch.equal(la.dequantize(), F.awq_dequantize_reference(qw2, qz2, sc2))
    assert lg.group_size == la.group_size == g
    x = torch.randn(4, k, dtype=torch.float16)
    for layer in (lg, la):
        y = layer(x)
        assert y.dtype == torch.float16
        torch.testing.assert_close(y.double(), x.double() @ ref.double().t() + bias.double(), rtol=2e-3, atol=2e-2)
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear.from_awq(qw2, qz2, sc2, group_size=g * 2)


# ---------------- load_quantized into a meta-device skeleton (defect: a silent no-op) ----------------
def test_load_quantized_into_a_meta_skeleton(tmp_path):
    """Loading a quantized checkpoint should not need the float weights allocated first: a skeleton built
    under torch.device("meta") gets the checkpoint's tensors (copying into meta tensors did nothing), a tied
    LM head stays tied and thrifty's Llama gets its rotary cache back."""
    from thrifty.models import Llama, LlamaConfig

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = quantize_model(Llama(LlamaConfig(**cfg)).init_weights(), {"bits": 4, "group_size": 32})
    path = str(tmp_path / "m.safetensors")
    save_quantized(model, path)
    with torch.device("meta"):
        skeleton = Llama(LlamaConfig(**cfg))
    loaded = load_quantized(skeleton, path)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 128, (1, 8))
    out, ref = loaded(ids), model(ids)
    out, ref = getattr(out, "logits", out), getattr(ref, "logits", ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # a plain module too
    make = lambda: nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 8))  # noqa: E731
    small = quantize_model(make(), {"bits": 8, "skip": ()})
    save_quantized(small, path)
    with torch.device("meta"):
        sk = make()
    x = torch.randn(2, 64)
    torch.testing.assert_close(load_quantized(sk, path)(x), small(x), rtol=0, atol=0)
