"""thrifty.ops wrappers skip the Python autograd kernel when no gradient is needed (ops._common.call_op):
the same results, gradients wherever an input requires one, and torch.compile traces the plain call."""
from __future__ import annotations

import pytest
import torch

import thrifty
from thrifty.nn.quant import QuantLinear
from thrifty.ops import _common


def _calls(device):
    """name -> (fn(*tensors), float tensors it takes): one call per wrapper that goes through call_op."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    attn_dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    cache = thrifty.ops.build_rotary_cache(16, 32, device=device)
    pos = torch.arange(5, device=device)
    qlin = QuantLinear.from_float(torch.nn.Linear(64, 24), bits=4, group_size=32).to(device)
    return {
        "rms_norm": (lambda x, w: thrifty.ops.rms_norm(x, w), [r(5, 40), r(40)]),
        "fused_add_rms_norm": (lambda x, res, w: thrifty.ops.rms_norm(x, w, residual=res)[0], [r(5, 40), r(5, 40), r(40)]),
        "swiglu": (thrifty.ops.swiglu, [r(5, 24), r(5, 24)]),
        "linear": (thrifty.ops.linear, [r(3, 24), r(7, 24), r(7)]),
        "rotary": (lambda q, k: torch.cat([t.flatten() for t in thrifty.ops.rotary_embedding(q, k, pos, cache)]),
                   [r(5, 4, 16), r(5, 2, 16)]),
        "quant_linear": (lambda x: qlin(x), [r(3, 64)]),
        # CUDA attention takes 16-bit inputs only
        "flash_attention": (lambda q, k, v: thrifty.ops.flash_attention(q, k, v, causal=True),
                            [t.to(attn_dtype) for t in (r(1, 9, 2, 16), r(1, 9, 2, 16), r(1, 9, 2, 16))]),
    }


class _CountingGuard:
    """Stands in for torch._C._AutoDispatchBelowAutograd and counts how often call_op enters it."""

    entered = 0

    def __init__(self):
        self.guard = torch._C._AutoDispatchBelowAutograd()

    def __enter__(self):
        type(self).entered += 1
        return self.guard.__enter__()

    def __exit__(self, *exc):
        return self.guard.__exit__(*exc)


@pytest.fixture
def counting_guard(monkeypatch):
    _CountingGuard.entered = 0
    monkeypatch.setattr(_common, "_BelowAutograd", _CountingGuard)
    return _CountingGuard


@pytest.mark.parametrize("name", list(_calls("cpu")))
def test_calls_without_grad_skip_autograd_and_match(device, name, counting_guard):
    fn, args = _calls(device)[name]
    with torch.no_grad():
        want = fn(*args)
    assert counting_guard.entered >= 1
    # grad mode on but nothing requires grad: the fast path too
    counting_guard.entered = 0
    got = fn(*args)
    assert counting_guard.entered >= 1 and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(fn(*args), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(_calls("cpu")))
def test_each_input_that_requires_grad_gets_one(device, name, counting_guard):
    fn, args = _calls(device)[name]
    for i in range(len(args)):  # one input at a time requires grad, the others stay frozen
        leaves = [a.clone().requires_grad_(j == i) for j, a in enumerate(args)]
        counting_guard.entered = 0
        out = fn(*leaves)
        assert counting_guard.entered == 0 and out.requires_grad
        out.float().square().sum().backward()
        assert leaves[i].grad is not None and torch.isfinite(leaves[i].grad).all()
        assert leaves[i].grad.abs().sum() > 0
        assert all(leaves[j].grad is None for j in range(len(args)) if j != i)


def test_torch_compile_traces_the_plain_call_under_no_grad():
    x, w = torch.randn(4, 32), torch.randn(32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w):
        with torch.no_grad():
            return thrifty.ops.rms_norm(x, w) * 2

    torch.testing.assert_close(f(x, w), thrifty.ops.rms_norm(x, w) * 2)
