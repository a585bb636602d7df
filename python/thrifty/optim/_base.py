"""Shared machinery of thrifty's fused optimizers: validation, the fused grad-norm / inf check,
lr as a tensor, per-bucket dispatch, and a load_state_dict that keeps float32 state float32."""
from __future__ import annotations

import math
import numbers
from collections import defaultdict
from itertools import chain

import torch

import thrifty.ops.optim  # noqa: F401  (fake registrations)

_ops = torch.ops.thrifty


def _real(name: str, value) -> float:
    """``value`` as a float if it is a real number, as torch.optim takes it: int, float, numpy floating /
    integer scalars (a LambdaLR returning np.float32 under NumPy 2 puts one into the group) and 0-d numpy
    arrays; bool (and numpy bool), str, None, complex and the like raise TypeError."""
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    if kind in ("f", "i", "u") and getattr(value, "ndim", None) == 0:  # a numpy scalar or 0-d array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (got {type(value).__name__})")
    return float(value)


def _plain(value) -> bool:
    return type(value) in (float, int) or isinstance(value, torch.Tensor)


def _check_finite(name: str, value, lo: float | None = None, hi: float | None = None, hi_open: bool = False) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-value tensor (got shape {tuple(value.shape)})")
        if value.device.type != "cpu":  # reading a device value would sync: checked by the kernel's caller instead
            return
        value = value.item()
    value = _real(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite (got {value})")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo} (got {value})")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi} (got {value})")


# torch.optim keywords accepted for drop-in use. foreach / fused only choose among torch's
# implementations of the same math, so any bool (or None) is accepted: thrifty always runs its one
# fused multi-tensor step. amsgrad, maximize, capturable and differentiable change what a step does or
# allows; thrifty implements none of them, so any value but torch's default raises instead of being ignored.
TORCH_FLAGS = {"amsgrad": False, "maximize": False, "foreach": None, "fused": None, "capturable": False,
               "differentiable": False}
_IMPLEMENTATION_FLAGS = ("foreach", "fused")


def _check_torch_flags(owner: str, flags: dict, where: str = "") -> None:
    for name, value in flags.items():
        default = TORCH_FLAGS[name]
        if value is default or (default is False and type(value) is int and value == 0):
            continue
        if name in _IMPLEMENTATION_FLAGS and (value is None or isinstance(value, bool)):
            continue
        if name in ("amsgrad", "maximize"):
            raise NotImplementedError(f"{owner}: {where}{name}={value!r} is not supported (only torch's default "
                                      f"{name}={default!r})")
        if name in _IMPLEMENTATION_FLAGS:
            raise ValueError(f"{owner}: {where}{name}={value!r} must be None, True or False")
        raise ValueError(f"{owner}: {where}{name}={value!r} is not supported: thrifty always runs its own fused "
                         f"multi-tensor step; pass {name}={default!r} (torch's default) or leave it out")


class FusedOptimizer(torch.optim.Optimizer):
    """Base of AdamW, AdamW8bit and Lion. Subclasses implement ``_init_state`` and ``_step_bucket``.

    Reports: ``last_step_skipped`` (bool: the last step() found inf/nan grads and changed
    nothing), ``skipped_steps`` (int, running count), ``last_grad_norm`` (float32 tensor, the
    global grad norm of the last step when clipping or the inf check computed it, else None).
    Reading them on CUDA syncs; the step itself never does.
    """

    # torch.amp.GradScaler sets .grad_scale and .found_inf and lets step() unscale and skip.
    _step_supports_amp_scaling = True
    _needs_steps = True

    def __init__(self, params, defaults: dict, *, max_grad_norm: float | None, skip_nonfinite: bool):
        if max_grad_norm is not None:
            _check_finite("max_grad_norm", max_grad_norm, lo=0.0)
            if max_grad_norm <= 0:
                raise ValueError(f"max_grad_norm must be > 0 or None (got {max_grad_norm})")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.skip_nonfinite = bool(skip_nonfinite)
        super().__init__(params, defaults)
        self._lr_cache: dict = {}
        self._found: list[torch.Tensor] = []
        self._skipped_total: torch.Tensor | None = None
        self.last_grad_norm: torch.Tensor | None = None

    # ---- pickling / copy.deepcopy ----
    # torch.optim.Optimizer pickles only defaults, state and param_groups; the constructor's
    # keyword-only settings must travel too, or a copied optimizer cannot step.
    _pickled_attrs = ("max_grad_norm", "skip_nonfinite")

    def __getstate__(self):
        state = super().__getstate__()
        for name in self._pickled_attrs:
            state[name] = getattr(self, name)
        state["_skipped_total"] = self._skipped_total
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("skip_nonfinite", True)
        self.__dict__.setdefault("_skipped_total", None)
        self._lr_cache = {}
        self._found = []
        self.last_grad_norm = None

    # ---- param groups ----
    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, then the group's hyper-parameters are checked at once (a
        non-finite lr, betas, eps or weight_decay in a group raises here, not at the next step)."""
        super().add_param_group(param_group)
        try:
            # torch only warns on a tensor listed twice in a group (a future error there); the fused pass
            # would update it twice with step 1's bias correction, or race on it across threads
            params = self.param_groups[-1]["params"]
            if len({id(p) for p in params}) != len(params):
                raise ValueError("the same tensor is listed more than once in a param group; list each "
                                 "parameter once")
            self._check_group(self.param_groups[-1])
        except (TypeError, ValueError, NotImplementedError) as err:
            self.param_groups.pop()
            raise type(err)(f"param group {len(self.param_groups)}: {err}") from None

    def _check_group(self, group: dict) -> None:
        # torch flags set on a group (a param-group dict, or param_groups edited later) are checked too
        _check_torch_flags(type(self).__name__, {k: v for k, v in group.items() if k in TORCH_FLAGS})
        self._validate_group(group)
        # numpy scalars (checked above) become plain floats in the group: the kernels take floats, and a
        # state_dict holding np.float32 would not load with torch.load(weights_only=True)
        # (np.float64 subclasses float: the exact type is checked)
        for k in ("lr", "eps", "weight_decay"):
            if k in group and not _plain(group[k]):
                group[k] = _real(k, group[k])
        betas = group.get("betas")
        if betas is not None and not all(_plain(b) for b in betas):
            group["betas"] = tuple(b if _plain(b) else _real("betas", b) for b in betas)

    # ---- reporting ----
    @property
    def last_step_skipped(self) -> bool:
        return any(bool(f.item()) for f in self._found)

    @property
    def skipped_steps(self) -> int:
        return 0 if self._skipped_total is None else int(self._skipped_total.item())

    # ---- hooks for subclasses ----
    def _validate_group(self, group: dict) -> None:
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    # state tensors a subclass keeps as float32 moments of the param's shape
    _float_moments: tuple = ()
    # the keys of a param's state: all of _state_keys, and any of _optional_state_keys
    _state_keys: tuple = ()
    _optional_state_keys: tuple = ("master",)

    def _check_state_keys(self, state: dict, where, required, optional) -> None:
        """Another optimizer's state (Lion's into AdamW, AdamW's into Lion) is refused by its keys at load time;
        it loaded silently and then stepped with foreign moments, or failed at the step with a KeyError."""
        missing = [k for k in required if k not in state]
        unknown = sorted(k for k in state if k not in required and k not in optional)
        if missing or unknown:
            what = "; ".join(x for x in (f"lacks {missing}" if missing else "",
                                         f"has {unknown}" if unknown else "") if x)
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state of param {where} {what} (its keys: "
                             f"{sorted(state)}; {type(self).__name__} keeps {list(required)}): a state dict saved by "
                             "another optimizer?")

    def _check_loaded_state(self, p: torch.Tensor, state: dict, where) -> None:
        """A loaded state fits this optimizer now, not at the next step's kernel check: its keys, float moments of
        the param's shape (another float dtype, torch.optim's bf16 moments of bf16 params say, is widened to
        float32)."""
        owner = type(self).__name__
        for k in self._float_moments:
            v = state.get(k)
            if v is None:
                continue
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{owner}.load_state_dict: state {k!r} of param {where} has shape {tuple(v.shape)}, "
                                 f"the param {tuple(p.shape)}")
            if not v.is_floating_point():
                raise ValueError(f"{owner}.load_state_dict: state {k!r} of param {where} is {v.dtype}, not float "
                                 "moments (8-bit codes are thrifty.optim.AdamW8bit's: load the state dict there)")
            if v.dtype != torch.float32:
                state[k] = v.float()
        self._check_state_keys(state, where, self._state_keys, self._optional_state_keys)

    def _bucket_key(self, p: torch.Tensor, group: dict, state: dict):
        return (p.device, p.dtype, "master" in state)

    def _step_bucket(self, key, group: dict, params: list, grads: list, states: list, lr: torch.Tensor,
                     coef: torch.Tensor | None, found: torch.Tensor | None) -> None:
        raise NotImplementedError

    # ---- helpers ----
    def _lr_tensor(self, lr, device: torch.device) -> torch.Tensor:
        if isinstance(lr, torch.Tensor):
            return lr.detach().to(device=device, dtype=torch.float32).reshape(())
        key = (device, float(lr))
        t = self._lr_cache.get(key)
        if t is None:
            if len(self._lr_cache) > 64:
                self._lr_cache.clear()
            t = torch.full((), float(lr), dtype=torch.float32, device=device)
            self._lr_cache[key] = t
        return t

    def _collect(self):
        """(group, params with grads, grads) per group, checked."""
        out = []
        for gi, group in enumerate(self.param_groups):
            self._check_group(group)
            ps, gs = [], []
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                where = f"param_groups[{gi}]['params'][{pi}]"
                if g.is_sparse or g.layout != torch.strided:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"({where} has a {g.layout} grad)")
                if g.dtype != p.dtype:
                    raise TypeError(f"{type(self).__name__}: the grad of {where} has dtype {g.dtype}, "
                                    f"its param has {p.dtype}: they must match")
                if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                    raise TypeError(f"{type(self).__name__}: {where} has dtype {p.dtype}; "
                                    "expected float32, bfloat16 or float16")
                if g.shape != p.shape:
                    raise ValueError(f"{type(self).__name__}: the grad of {where} has shape {tuple(g.shape)}, "
                                     f"its param {tuple(p.shape)}")
                ps.append(p)
                gs.append(g if g.is_contiguous() else g.contiguous())
            out.append((group, ps, gs))
        return out

    def _prepare(self, all_grads: list[torch.Tensor]):
        """Per device: (coef, found) tensors, or None where not needed. No host sync."""
        grad_scale = getattr(self, "grad_scale", None)
        scaler_found = getattr(self, "found_inf", None)
        devices = sorted({g.device for g in all_grads}, key=str)
        need_norm = self.max_grad_norm is not None or (self.skip_nonfinite and scaler_found is None)
        norm = None
        by_dev = defaultdict(list)
        if need_norm and all_grads:
            for g in all_grads:
                by_dev[g.device].append(g)
            norms = [_ops.multi_tensor_l2norm(by_dev[d]) for d in devices]
            if len(norms) == 1:
                norm = norms[0]
            else:
                norm = torch.stack([n.to(devices[0]) for n in norms]).square().sum().sqrt()
            if grad_scale is not None:
                norm = norm / grad_scale.to(norm.device, torch.float32)
        self.last_grad_norm = norm
        found0 = None
        if scaler_found is not None:
            # GradScaler's found_inf comes from its own element-wise check of these same grads; an
            # overflowed (inf) norm of finite grads clips to zero below instead of skipping
            found0 = torch.as_tensor(scaler_found).float().reshape(()).to(devices[0] if devices else "cpu")
        elif norm is not None and self.skip_nonfinite:  # off: inf/nan grads step, as clip_grad_norm_ + torch.optim
            found0 = self._nonfinite_grads(norm, by_dev, devices)
        coef0 = None
        if self.max_grad_norm is not None and norm is not None:
            # clip_grad_norm_'s coefficient; an inf norm of finite grads (float32 overflow) gives 0, as
            # clip_grad_norm_ does with its own float32 norm: the step then runs on zeroed grads
            coef0 = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        if grad_scale is not None:
            inv = grad_scale.to(torch.float32).reciprocal().reshape(())
            coef0 = inv if coef0 is None else coef0 * inv.to(coef0.device)
        per_dev = {}
        for d in devices:
            per_dev[d] = (None if coef0 is None else coef0.to(d).reshape(()),
                          None if found0 is None else found0.to(d).reshape(()))
        return per_dev

    @staticmethod
    def _nonfinite_grads(norm: torch.Tensor, by_dev: dict, devices: list) -> torch.Tensor:
        """1.0 if some grad element is inf/nan, else 0.0 (float32 scalar on norm's device). No host sync
        on a GPU (where an overflowed norm counts as non-finite, see below).

        A non-finite norm alone is no proof: the float32 sum of squares overflows past ~3.4e38 (grads of
        ~1e18 and up) with every element finite, and torch.optim steps on such grads. A nan norm does mean
        a nan element (sums of squares of finite values never make nan); an inf one takes the element-wise
        look: max |g| per grad (torch._foreach_norm's inf-norm, which cannot overflow and keeps nan)."""
        bad = ~torch.isfinite(norm)
        if norm.device.type != "cpu":
            # on a GPU, telling an overflowed norm from an inf element would take one more read of all the
            # grads every step (branching on the norm would sync): there an inf norm skips the step, i.e.
            # grads whose float32 sum of squares overflows (|g| ~1e18 and up) count as non-finite
            return bad.float()
        # a CPU value: reading it is free, so the extra pass over the grads runs only in the rare case
        if not bool(bad) or bool(torch.isnan(norm)):
            return bad.float()
        # grouped by dtype: a mixed list would leave torch's multi-tensor path for a launch per tensor (an
        # empty grad has no inf-norm)
        groups = defaultdict(list)
        for d in devices:
            for g in by_dev[d]:
                if g.numel():
                    groups[(d, g.dtype)].append(g)
        amax = [torch.stack(torch._foreach_norm(gs, float("inf"))).max().float().to(norm.device)
                for gs in groups.values()]
        if not amax:
            return bad.float()
        return (~torch.isfinite(torch.stack(amax).max())).float()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        collected = self._collect()
        all_grads = list(chain.from_iterable(gs for _, _, gs in collected))
        per_dev = self._prepare(all_grads)
        self._found = [f for _, f in per_dev.values() if f is not None]
        for f in self._found[:1]:
            s = (f > 0).to(torch.int64)
            self._skipped_total = s if self._skipped_total is None else self._skipped_total + s.to(
                self._skipped_total.device)
        for group, ps, gs in collected:
            buckets = defaultdict(lambda: ([], [], []))
            for p, g in zip(ps, gs):
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, group, state)
                b = buckets[self._bucket_key(p, group, state)]
                b[0].append(p)
                b[1].append(g)
                b[2].append(state)
            for key, (bp, bg, bs) in buckets.items():
                dev = bp[0].device
                coef, found = per_dev[dev]
                # The kernels update contiguous memory in place; a non-contiguous param (a
                # transposed or channels_last weight) steps through a contiguous copy written back.
                work = [p if p.is_contiguous() else p.contiguous() for p in bp]
                self._step_bucket(key, group, work, bg, bs, self._lr_tensor(group["lr"], dev), coef, found)
                for p, w in zip(bp, work):
                    if w is not p:
                        p.copy_(w)
                # The kernels write the params behind autograd's back: bump their version counters as torch's
                # in-place updates do, so a graph that saved a param before the step refuses a backward through
                # it ("modified by an inplace operation") instead of differentiating with the updated weights.
                if not torch.compiler.is_compiling():
                    for p, w in zip(bp, work):  # one tensor per call: a list is taken only by newer torch
                        if w is p:
                            torch.autograd.graph.increment_version(p)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, but state tensors keep their saved dtype (torch would cast float32
        master weights, moments and scales to the param's bfloat16) and move to the param's device.

        A torch.optim state dict loads too: its amsgrad / maximize must be False (else NotImplementedError)
        and its decoupled_weight_decay True unless weight_decay is 0 (torch.optim.Adam's L2 decay is
        another update); its foreach / fused / capturable / differentiable are dropped (they choose
        among torch's implementations, not the update)."""
        owner = type(self).__name__
        # torch's load_state_dict runs the load_state_dict pre-hooks first and loads what they return: run them
        # here, so that the checks and the dtype-keeping copy below see that dict too, not the one passed in
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        for gi, g in enumerate(state_dict["param_groups"]):
            _check_torch_flags(owner, {k: g[k] for k in ("amsgrad", "maximize") if k in g},
                               f"param group {gi} of the state dict: ")
            if g.get("decoupled_weight_decay", True) is False and g.get("weight_decay", 0) != 0:
                raise ValueError(f"{owner}: param group {gi} of the state dict has decoupled_weight_decay=False "
                                 f"with weight_decay={g['weight_decay']} (torch.optim.Adam's L2 penalty); "
                                 "thrifty's weight decay is decoupled (AdamW)")
        saved_state = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        own_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        # the pre-hooks already ran above (not twice); the post-hooks run at the end, on the state as loaded
        # here (torch's would run inside its load, on moments and masters it has cast to the param dtype,
        # and what they changed would then be overwritten below)
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = type(pre_hooks)()
        self._optimizer_load_state_dict_post_hooks = type(post_hooks)()
        # torch's load replaces self.state and self.param_groups with new objects: kept, to be put back when the
        # checks below refuse what was loaded (a refused state dict left its lrs and foreign state behind)
        before = (self.state, self.param_groups)
        try:
            self._load_state_dict_checked(state_dict, saved_state, saved_ids, own_groups)
        except BaseException:
            self.state, self.param_groups = before
            raise
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        self._lr_cache = {}
        for post_hook in post_hooks.values():
            post_hook(self)

    def _load_state_dict_checked(self, state_dict, saved_state, saved_ids, own_groups) -> None:
        super().load_state_dict(state_dict)
        # settings the saved groups lack (master_weights in a torch.optim.AdamW state dict) keep
        # this optimizer's values instead of vanishing; torch's flags (checked above, or selectors of
        # torch's implementations) are not kept, so thrifty's state dicts never carry them
        for own, group in zip(own_groups, self.param_groups):
            for k in (*TORCH_FLAGS, "decoupled_weight_decay"):
                if k not in own:
                    group.pop(k, None)
            for k, v in own.items():
                group.setdefault(k, v)
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for sid, p in zip(saved_ids, params):
            if sid not in saved_state:
                continue
            st = self.state[p]
            for k, v in saved_state[sid].items():
                if isinstance(v, torch.Tensor):
                    st[k] = v.detach().to(device=p.device, copy=True)
                elif k == "step" and isinstance(v, (int, float)):  # older torch.optim state dicts
                    st[k] = torch.tensor(float(v), dtype=torch.float32, device=p.device)
        for sid, p in zip(saved_ids, params):
            if self.state.get(p):
                self._check_loaded_state(p, self.state[p], sid)
        # a state saved without master copies (e.g. by torch.optim.AdamW) loaded into groups that
        # keep them: start the masters from the params, as a fresh step would
        for group in self.param_groups:
            if not group.get("master_weights", False):
                continue
            for p in group["params"]:
                st = self.state.get(p)
                if st and "master" not in st and p.dtype != torch.float32:
                    st["master"] = p.detach().float().contiguous()
