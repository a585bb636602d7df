"""linear_cross_entropy: against F.cross_entropy(hidden @ W.T) in float64 for every reduction
(gradients of "none" included), ignore_index, label smoothing, softcap, float32 and bfloat16,
chunking, opcheck, torch.compile, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import thrifty
from reference import assert_close_to_ref

REDUCTIONS = ["mean", "sum", "none"]


def make(T, H, V, dtype, device, ignore_frac=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, H, generator=g) * 1.5).to(dtype).to(device)
    w = (torch.randn(V, H, generator=g) / H ** 0.5 * 2).to(dtype).to(device)
    y = torch.randint(0, V, (T,), generator=g)
    y[torch.rand(T, generator=g) < ignore_frac] = -100
    return h, w, y.to(device)


def torch_loss(h, w, y, reduction, label_smoothing=0.0, softcap=0.0, ignore_index=-100):
    z = h @ w.T
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, y, reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index)


def run(fn, h, w, y, gout, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(h, w, y, **kw)
    (loss.double() * gout).sum().backward()
    return loss.detach(), h.grad, w.grad


LS_CAP = dict(label_smoothing=0.25, softcap=2.5)
GRID = [((37, 24, 101), 8, {}), ((37, 24, 101), 8, dict(label_smoothing=0.1)), ((37, 24, 101), 8, dict(softcap=4.0)),
        ((64, 65, 1000), 0, LS_CAP), ((5, 16, 7), 2, {}), ((5, 16, 7), 2, LS_CAP)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,chunk,opts", GRID,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else
                         ("-".join(f"{k}{x}" for k, x in v.items()) or "plain") if isinstance(v, dict) else f"c{v}")
def test_against_torch(cpu_isa, device, reduction, dtype, shape, chunk, opts):
    T, H, V = shape
    h, w, y = make(T, H, V, dtype, device)
    g = torch.Generator().manual_seed(1)  # the same incoming gradient on every run and device
    gout = torch.randn(T if reduction == "none" else (), dtype=torch.float64, generator=g).to(device)
    ours = run(thrifty.ops.linear_cross_entropy, h, w, y, gout, reduction=reduction, chunk_size=chunk, **opts)
    ref = run(torch_loss, h.double(), w.double(), y, gout, reduction=reduction, **opts)
    lowp = run(torch_loss, h, w, y, gout, reduction=reduction, **opts)
    assert ours[0].dtype == dtype
    for name, a, r, l in zip(("loss", "grad_hidden", "grad_weight"), ours, ref, lowp):
        if dtype == torch.float32:
            scale = r.abs().max().item() + 1e-6
            assert (a.double() - r).abs().max().item() <= 2e-5 * scale + 1e-6, name
        else:
            assert_close_to_ref(a, r, l, factor=2.0, atol=1e-3 * (r.abs().max().item() + 1e-3), name=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index_and_leading_dims(reduction):
    h, w, y = make(2 * 9, 32, 50, torch.float32, "cpu", ignore_frac=0.4)
    y[y == -100] = 7
    y[::3] = 3  # ignore the label 3 instead of -100
    h3, y2 = h.view(2, 9, 32), y.view(2, 9)
    gout = torch.randn(y2.shape if reduction == "none" else (), dtype=torch.float64)
    ours = run(thrifty.ops.linear_cross_entropy, h3, w, y2, gout, reduction=reduction, ignore_index=3)
    ref = run(lambda a, b, c, **k: torch_loss(a.reshape(-1, 32), b, c.reshape(-1), **k).reshape(
        c.shape if reduction == "none" else ()), h3.double(), w.double(), y2, gout, reduction=reduction,
        ignore_index=3)
    assert ours[0].shape == ref[0].shape
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.double(), r, rtol=2e-5, atol=1e-6)


def test_all_ignored_matches_torch():
    h, w, _ = make(6, 8, 11, torch.float32, "cpu")
    y = torch.full((6,), -100)
    loss, gh, gw = run(thrifty.ops.linear_cross_entropy, h, w, y, torch.tensor(1.0, dtype=torch.float64))
    assert torch.isnan(loss) and torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


def test_no_grad_forward_and_weight_only_grad():
    h, w, y = make(20, 16, 30, torch.float32, "cpu")
    with torch.no_grad():
        a = thrifty.ops.linear_cross_entropy(h, w, y)
    torch.testing.assert_close(a, torch_loss(h, w, y, "mean"))
    w2 = w.clone().requires_grad_()
    thrifty.ops.linear_cross_entropy(h, w2, y, reduction="sum").backward()
    w3 = w.clone().requires_grad_()
    torch_loss(h, w3, y, "sum").backward()
    torch.testing.assert_close(w2.grad, w3.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, device):
    h, w, y = make(13, 24, 40, dtype, device)
    h.requires_grad_()
    w.requires_grad_()
    for red in (0, 1, 2):
        torch.library.opcheck(torch.ops.thrifty.linear_cross_entropy, (h, w, y, -100, red, 0.1, 3.0, 4))
    hd, wd = h.detach(), w.detach()
    _, lse = torch.ops.thrifty.linear_cross_entropy(hd, wd, y, -100, 0, 0.0, 0.0, 0)
    torch.library.opcheck(torch.ops.thrifty.linear_cross_entropy_backward,
                          (torch.randn(13, device=device), hd, wd, y, lse, -100, 0, 0.0, 0.0, 7))
    torch.library.opcheck(torch.ops.thrifty.linear_cross_entropy_backward,
                          (torch.tensor(2.0, device=device), hd, wd, y, lse, -100, 1, 0.1, 2.0, 0))
    # the forward that keeps its logits, and the backward that takes them
    for red in (0, 1, 2):
        torch.library.opcheck(torch.ops.thrifty.linear_cross_entropy_keep_logits, (h, w, y, -100, red, 0.1, 3.0))
    _, lse, logits = torch.ops.thrifty.linear_cross_entropy_keep_logits(hd, wd, y, -100, 0, 0.0, 0.0)
    assert logits.shape == (13, 40) and logits.dtype == dtype
    torch.library.opcheck(torch.ops.thrifty.linear_cross_entropy_backward,
                          (torch.randn(13, device=device), hd, wd, y, lse, -100, 0, 0.0, 0.0, 0, logits))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_logits_give_the_recomputed_gradients(device, reduction, dtype):
    # chunk_size=0 keeps the forward's logits for the backward (small input, grads needed); chunk_size=T runs
    # the same one-chunk forward and recomputes them: the same numbers up to the matmuls' blocking
    T, H, V = 29, 40, 203
    h, w, y = make(T, H, V, dtype, device)
    if dtype == torch.bfloat16 and device.type == "cpu" and not thrifty.ops.loss._cpu_multiplies_bf16():
        pytest.skip("below avx512_bf16 the CPU multiplies bfloat16 in float32 copies: logits are not kept")
    assert thrifty.ops.loss._keep_logits(h.requires_grad_(), w, 0)
    gout = torch.randn(T if reduction == "none" else (), dtype=torch.float64).to(device)
    kept = run(thrifty.ops.linear_cross_entropy, h, w, y, gout, reduction=reduction, **LS_CAP)
    recomputed = run(thrifty.ops.linear_cross_entropy, h, w, y, gout, reduction=reduction, chunk_size=T, **LS_CAP)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-4)
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, **tol)


def test_kept_logits_survive_a_retained_graph():
    # the backward turns its copy of the logits into the gradient in place: a second backward must see the logits
    h, w, y = make(16, 24, 50, torch.float32, "cpu")
    h.requires_grad_()
    loss = thrifty.ops.linear_cross_entropy(h, w, y, label_smoothing=0.1)
    assert "linear_cross_entropy_keep_logits" in loss.grad_fn.name()
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first, rtol=0, atol=0)


def test_when_logits_are_kept(monkeypatch):
    h, w, y = make(16, 24, 50, torch.float32, "cpu")
    keep = thrifty.ops.loss._keep_logits
    assert not keep(h, w, 0)  # nothing needs a gradient
    hg = h.clone().requires_grad_()
    assert keep(hg, w, 0) and not keep(hg, w, 8)  # an explicit chunk size is kept to
    with torch.no_grad():
        assert not keep(hg, w, 0)
    monkeypatch.setattr(thrifty.ops.loss, "KEEP_LOGITS_BYTES", 16 * 50 * 4 - 1)  # one byte short
    assert not keep(hg, w, 0)
    loss = thrifty.ops.linear_cross_entropy(hg, w, y)
    assert "keep_logits" not in loss.grad_fn.name()  # the recomputing op
    loss.backward()
    ref = run(torch_loss, h.double(), w.double(), y, torch.tensor(1.0, dtype=torch.float64), reduction="mean")
    torch.testing.assert_close(hg.grad.double(), ref[1], rtol=2e-5, atol=1e-6)


def test_backward_rejects_logits_of_the_wrong_shape():
    h, w, y = make(6, 16, 30, torch.float32, "cpu")
    _, lse, logits = torch.ops.thrifty.linear_cross_entropy_keep_logits(h, w, y, -100, 1, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"'logits' must have shape \(6, 30\)"):
        torch.ops.thrifty.linear_cross_entropy_backward(torch.tensor(1.0), h, w, y, lse, -100, 1, 0.0, 0.0, 0,
                                                        logits[:, :-1])
    with pytest.raises(TypeError, match="'logits' must have the same dtype as 'hidden'"):
        torch.ops.thrifty.linear_cross_entropy_backward(torch.tensor(1.0), h, w, y, lse, -100, 1, 0.0, 0.0, 0,
                                                        logits.double())


def test_torch_compile_fullgraph():
    h, w, y = make(16, 32, 64, torch.float32, "cpu")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(h, w, y):
        return thrifty.ops.linear_cross_entropy(h * 2, w, y, label_smoothing=0.1)

    hc, wc = h.clone().requires_grad_(), w.clone().requires_grad_()
    f(hc, wc, y).backward()
    he, we = h.clone().requires_grad_(), w.clone().requires_grad_()
    thrifty.ops.linear_cross_entropy(he * 2, we, y, label_smoothing=0.1).backward()
    torch.testing.assert_close(hc.grad, he.grad)
    torch.testing.assert_close(wc.grad, we.grad)


BAD = [
    (lambda h, w, y: (h, w.double(), y), {}, TypeError, "'weight' must have the same dtype as 'hidden'"),
    (lambda h, w, y: (h.long(), w, y), {}, TypeError, "'hidden' must have dtype Float, BFloat16 or Half"),
    (lambda h, w, y: (h, w, y.int()), {}, TypeError, "'labels' must have dtype Long"),
    (lambda h, w, y: (h, w[:, :-1], y), {}, ValueError, "'weight' must have size 16 in dimension 1"),
    (lambda h, w, y: (h, w, y[:-1]), {}, ValueError, "'labels' must have the leading dims of 'hidden'"),
    (lambda h, w, y: (h, w, y.clone().fill_(30)), {}, ValueError, r"'labels' must be in \[0, 30\)"),
    (lambda h, w, y: (h, w, y.clone().fill_(-5)), {}, ValueError, r"labels\[0\] = -5"),
    (lambda h, w, y: (h, w, y), dict(reduction="avg"), ValueError, "'reduction' must be 'mean', 'sum' or 'none'"),
    (lambda h, w, y: (h, w, y), dict(label_smoothing=1.5), ValueError, r"'label_smoothing' must be in \[0, 1\]"),
    (lambda h, w, y: (h, w, y), dict(softcap=-1.0), ValueError, "'softcap' must be finite and >= 0"),
    (lambda h, w, y: (h, w[:0], y), {}, ValueError, "'weight' must have at least one row"),
    (lambda h, w, y: (h, w[0], y), {}, ValueError, "'weight' must be 2-D"),
]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])  # grad: the op that keeps the logits
@pytest.mark.parametrize("case", BAD, ids=lambda c: c[3][:40])
def test_bad_input(case, grad):
    make_args, kw, exc, msg = case
    h, w, y = make(6, 16, 30, torch.float32, "cpu", ignore_frac=0.0)
    with pytest.raises(exc, match=msg):
        thrifty.ops.linear_cross_entropy(*make_args(h.requires_grad_(grad), w, y), **kw)


@pytest.mark.cuda
def test_cuda_device_mismatch():
    h, w, y = make(6, 16, 30, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="'weight' must be on the same device"):
        thrifty.ops.linear_cross_entropy(h, w.cuda(), y)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_loss_is_float32_as_cross_entropy_after_an_autocast_linear(reduction):
    """Under torch.autocast the LM head's matmul runs in bf16 (linear's rule) and the loss comes back in
    float32, as F.cross_entropy(F.linear(h, W), y) gives it there; outside autocast it is in hidden's dtype."""
    h, w, y = make(37, 64, 300, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w), y, reduction=reduction)
        got = thrifty.ops.linear_cross_entropy(h, w, y, reduction=reduction)
    assert ref.dtype == got.dtype == torch.float32
    # both from bf16 logits; thrifty's loss is not rounded to bf16 on the way out
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=1e-2)
    exact = torch_loss(h.bfloat16().double(), w.bfloat16().double(), y, reduction)
    torch.testing.assert_close(got.double(), exact, atol=1e-2, rtol=1e-2)  # from bf16 logits, as torch's
    assert (got != got.bfloat16().float()).any()  # and not rounded to bf16 on the way out
    hb, wb = h.bfloat16(), w.bfloat16()
    assert thrifty.ops.linear_cross_entropy(hb, wb, y, reduction=reduction).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # gradients reach the float32 leaves
        hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = thrifty.ops.linear_cross_entropy(hl, wl, y, reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    assert hl.grad.dtype == wl.grad.dtype == torch.float32 and torch.isfinite(hl.grad).all()


def test_isa_switch_from_another_thread_mid_call_is_safe():
    """set_cpu_isa is process-wide; a call reads the level once. The bf16 loss read it per operand, so a switch
    from another thread between two reads widened hidden but not the kept logits, and the kernels wrote float32
    gradients into the bf16 buffer (heap corruption, the process aborted within seconds)."""
    import threading
    import time
    C = thrifty._C
    if C.cpu_isa() != "avx512_bf16":
        pytest.skip("needs a CPU at avx512_bf16 (the switch to avx2 changes the operands' dtype)")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(90, 48, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(500, 48, generator=g) * 0.1).bfloat16().requires_grad_()
    lab = torch.randint(0, 500, (90,), generator=g)
    ref = thrifty.ops.linear_cross_entropy(h.detach().float(), w.detach().float(), lab)
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            C.set_cpu_isa("avx2")
            C.set_cpu_isa("avx512_bf16")

    t = threading.Thread(target=flip)
    t.start()
    try:
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            loss = thrifty.ops.linear_cross_entropy(h, w, lab)
            loss.backward()
            assert abs(loss.float().item() - ref.item()) < 0.05
    finally:
        stop.set()
        t.join()
        C.set_cpu_isa("avx512_bf16")
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
