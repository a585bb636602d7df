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
