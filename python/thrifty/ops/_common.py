"""Helpers shared by the op wrappers."""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch


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
