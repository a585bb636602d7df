"""Helpers shared by the op wrappers."""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
import torch.autograd.forward_ad as _forward_ad


def _tensors_of(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, torch.Tensor):
                yield v


_BelowAutograd = torch._C._AutoDispatchBelowAutograd


def call_op(op: Callable, *args):
    """``op(*args)`` for an op whose autograd is registered in Python (torch.library.register_autograd).

    That autograd kernel runs on every call, also when nothing needs a gradient (inference, no_grad,
    frozen weights), and costs about as much as the dispatch of the op itself: ~7 us of Python per call,
    more than a decode-sized GPU kernel runs. When grad mode is off or no tensor argument requires grad,
    there is no graph to record, so the call goes straight below the autograd keys (what that kernel
    would do after its check). Under torch.compile the plain call is traced."""
    if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        return op(*args)
    with _BelowAutograd():
        return op(*args)


def register_fake(opname: str) -> Callable:
    """torch.library.register_fake, plus a device check the dispatcher does not make: an op called
    with a "meta" tensor among real ones is dispatched to the Meta key, i.e. to this fake, which
    would hand back uninitialised tensors on the real device instead of an error. Here that mix
    raises a ValueError naming both arguments. (Under FakeTensorMode and on all-meta inputs the
    devices agree, so tracing is unaffected.)"""

    def deco(fn: Callable) -> Callable:
        names = list(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            bound = list(zip(names, args)) + list(kwargs.items())
            meta = real = None
            for name, value in bound:
                for t in _tensors_of(value):
                    if t.device.type == "meta":
                        meta = meta or (name, t.device)
                    else:
                        real = real or (name, t.device)
            if meta and real:
                raise ValueError(f"{opname}: argument '{meta[0]}' is on device {meta[1]} but argument '{real[0]}' "
                                 f"is on {real[1]}; all tensors must be on the same device")
            return fn(*args, **kwargs)

        torch.library.register_fake(opname)(checked)
        return fn

    return deco


def register_no_double_backward(opname: str) -> None:
    """Registers autograd for a backward op (e.g. "thrifty::rms_norm_backward") that raises
    when differentiated again, instead of PyTorch's silent not-implemented fallback."""

    def _backward(ctx, *grads):
        raise NotImplementedError(f"{opname} is not differentiable (double backward of a thrifty op is not supported)")

    torch.library.register_autograd(opname, _backward)


def register_not_differentiable(opname: str, why: str, allowed: Callable | None = None) -> None:
    """Registers autograd for a forward op with no useful derivative (quantizers, integer GEMMs), so
    that backpropagating through it raises a message naming the op, instead of PyTorch's fallback,
    which warns and silently leaves the inputs' .grad as None.

    ``allowed(ctx, *grads)``, when given, returns the gradients the op does have (e.g. a bias's) as
    a tuple with None for the rest; it is called only when no other input needs a gradient."""

    def _setup(ctx, inputs, output):
        ctx.inputs_meta = [(t.dtype, t.shape) if isinstance(t, torch.Tensor) else None for t in inputs]

    def _backward(ctx, *grads):
        if allowed is not None:
            result = allowed(ctx, *grads)
            blocked = [i for i, need in enumerate(ctx.needs_input_grad) if need and result[i] is None]
            if not blocked:
                return result
        raise RuntimeError(f"{opname} is not differentiable: {why}. Detach its inputs "
                           f"(x.detach()) or compute the gradient-carrying part outside it")

    torch.library.register_autograd(opname, _backward, setup_context=_setup)


def require_tensors(op: str, **args) -> None:
    """TypeError naming the first argument that is not a tensor (None included: pass optional
    arguments only when they are given). Cheap enough for every call: isinstance per argument."""
    for name, value in args.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: argument '{name}' must be a tensor, got {type(value).__name__}")
    refuse_tangents(op, args.items())


def refuse_tangents(op: str, named) -> None:
    """NotImplementedError naming the first of ``named`` ((name, tensor) pairs, iterated only while a dual level is
    open, so a generator costs nothing otherwise) that carries a forward-mode tangent."""
    if _forward_ad._current_level >= 0:  # a dual level is open (forward_ad, torch.func.jvp): rare, checked then
        for name, value in named:
            if _forward_ad.unpack_dual(value).tangent is not None:
                # torch.library ops with register_autograd have no forward-mode formula: torch would
                # silently give a zero / None tangent
                raise NotImplementedError(f"{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not "
                                          f"supported: argument '{name}' carries a tangent; the thrifty ops have "
                                          "reverse-mode gradients through autograd only (loss.backward(), "
                                          "torch.autograd.grad; torch.func.grad / vjp / jacrev do not run "
                                          "torch.library's custom-op autograd either)")


# Autocast rules of the custom ops, as torch's own ops have them (torch.amp's op lists): without one, an op under
# torch.autocast gets its inputs as the surrounding ops left them, e.g. a bf16 branch output and a float32
# residual stream, which the fused kernels refuse (they take one dtype).
_AUTOCAST_LIB = torch.library.Library("thrifty", "IMPL")
_AUTOCAST_POLICIES = ("fp32", "lower", "promote")


def _autocast_eligible(t, device_type: str) -> bool:
    # torch's rule (autocast_mode.h is_eligible): floating point, on the autocast device, not float64
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type
            and t.dtype != torch.float64)


def _autocast_target(args, device_type: str, policy: str) -> torch.dtype:
    if policy == "fp32":
        return torch.float32
    if policy == "lower":
        return torch.get_autocast_dtype(device_type)
    dtypes = {t.dtype for a in args for t in _tensors_of(a) if _autocast_eligible(t, device_type)}
    # promote: as torch's type promotion (bf16 + f16 -> float32, bf16 + float32 -> float32)
    return functools.reduce(torch.promote_types, dtypes) if dtypes else torch.float32


def register_autocast(opname: str, policy: str, *, devices: tuple[str, ...] = ("cpu", "cuda"),
                      keep: tuple[int, ...] = (), follow: tuple[int, ...] = ()) -> None:
    """The autocast rule of custom op ``opname`` on ``devices`` (each where torch supports autocast):

    - ``"fp32"``: floating inputs cast to float32, as torch's layer_norm on CUDA;
    - ``"lower"``: cast to the autocast dtype of the device (torch.get_autocast_dtype), as torch's linear and
      scaled_dot_product_attention (the matmul-bound ops);
    - ``"promote"``: cast to the widest floating dtype among the inputs, as torch's elementwise ops.

    ``keep``: positions of arguments left as they are (a quantized layer's float32 scales). ``follow``: positions
    left out of the target's choice and cast to it unless float32 already (a norm's weight, which the kernels take
    in the input's dtype or float32). float64 and non-floating tensors are left alone,
    as torch's autocast leaves them. The op then runs with autocast off; autograd sees the casts, so gradients
    reach the uncast tensors in their own dtype. A device not listed has no rule: the op runs on the dtypes it
    is given, as torch's ops outside its autocast lists do."""
    if policy not in _AUTOCAST_POLICIES:
        raise ValueError(f"register_autocast: policy must be one of {_AUTOCAST_POLICIES}, got {policy!r}")
    ns, name = opname.split("::")
    op = getattr(getattr(torch.ops, ns), name).default
    for device_type in devices:
        if not torch._C._is_autocast_available(device_type):
            continue
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def cast_and_call(*args, _device_type=device_type, _key=key):
            target = _autocast_target([a for i, a in enumerate(args) if i not in keep and i not in follow],
                                      _device_type, policy)

            def cast(a):
                if _autocast_eligible(a, _device_type):
                    return a.to(target)
                if isinstance(a, (list, tuple)):
                    return type(a)(cast(x) for x in a)
                return a

            def arg(i, a):
                if i in keep or (i in follow and (not _autocast_eligible(a, _device_type) or a.dtype == torch.float32)):
                    return a
                return cast(a)

            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*(arg(i, a) for i, a in enumerate(args)))

        op.py_impl(key)(cast_and_call)  # what tracing (torch.compile) dispatches to
        _AUTOCAST_LIB.impl(name, lambda _keyset, *args, _f=cast_and_call: _f(*args), key_name, with_keyset=True)
