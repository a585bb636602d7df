"""Packed weight formats (version 1, docs/QUANT_FORMATS.md), round-to-nearest quantizers and
importers from the public GPTQ and AWQ int4 checkpoint layouts.

thrifty's formats, N = out_features, K = in_features, G = group_size:
  W8: qweight int8 (N, K), scales float32 (N,):                w = q * s
  W4: qweight uint8 (N, K/2) (k even in the low nibble, k odd in the high one),
      scales, zeros float32 (N, K/G):                          w = (q - z[k // G]) * s[k // G]
      optional perm int64 (K,): input feature j of the packed weight is x[perm[j]] (act-order imports
      and GPTQ with act-order keep groups contiguous this way).
The CPU and CUDA kernels of format version 1 read the same layout; `to_kernel_layout` is the
explicit (today identity) conversion point should a device want another one.
"""
from __future__ import annotations

import torch

FORMAT_VERSION = 1
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds column AWQ_ORDER[i] of its 8


def _check(cond: bool, msg: str, exc=ValueError):
    if not cond:
        raise exc(msg)


# ---------------- packing ----------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: integer (N, K) with values in [0, 15], K even -> uint8 (N, K/2), k even in the low nibble."""
    _check(q.dim() == 2, f"pack_int4: q must be 2-D (out_features, in_features), got shape {tuple(q.shape)}")
    _check(q.shape[1] % 2 == 0, f"pack_int4: in_features must be even, got {q.shape[1]}")
    q = q.to(torch.int16)
    _check(bool(((q >= 0) & (q <= 15)).all()), "pack_int4: values must lie in [0, 15]")
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> uint8 (N, K) values in [0, 15] (inverse of pack_int4)."""
    _check(qweight.dtype == torch.uint8, f"unpack_int4: qweight must be uint8, got {qweight.dtype}", TypeError)
    lo, hi = qweight & 15, qweight >> 4
    return torch.stack([lo, hi], -1).reshape(qweight.shape[0], -1)


def to_kernel_layout(qweight: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The packed weight as the kernels of `device` read it (format version 1: one layout for CPU and CUDA)."""
    return qweight.to(device)


def dequantize_reference(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """float32 (N, K) from unpacked integer codes q (N, K): the reference the kernels are tested against."""
    if zeros is None:
        return q.float() * scales.float()[:, None]
    s = scales.float().repeat_interleave(group_size, 1)
    z = zeros.float().repeat_interleave(group_size, 1)
    return (q.float() - z) * s


# ---------------- round to nearest ----------------
def quantize_rtn_w8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: s = amax|w| / 127, q = round(w / s) in [-127, 127]."""
    w = w.float()
    s = w.abs().amax(1) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(w / s[:, None]), -127, 127).to(torch.int8)
    return q, s.contiguous()


def w4_group_params(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit scale and integer zero point of each row of wg (..., G): covers [min, max] (and 0)."""
    wmin = wg.amin(-1).clamp(max=0)
    wmax = wg.amax(-1).clamp(min=0)
    s = (wmax - wmin) / 15.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.clamp(torch.round(-wmin / s), 0, 15)
    return s, z


def quantize_rtn_w4(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric 4-bit RTN. Returns unpacked codes q uint8 (N, K), scales, zeros float32 (N, K/G)."""
    n, k = w.shape
    _check(group_size > 0 and group_size % 32 == 0,
           f"group_size must be a positive multiple of 32 (32, 64, 128, ...), got {group_size}")
    _check(k % group_size == 0, f"in_features K={k} is not a multiple of group_size={group_size}")
    wg = w.float().reshape(n, k // group_size, group_size)
    s, z = w4_group_params(wg)
    q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, 15).to(torch.uint8).reshape(n, k)
    return q, s.contiguous(), z.contiguous()


# ---------------- GPTQ / AWQ importers ----------------
def _unpack_int32_rows(qweight: torch.Tensor) -> torch.Tensor:
    """(R, C) int32 packed along rows (8 nibbles, nibble j = row 8r + j) -> (8R, C) int64."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    q = (qweight.unsqueeze(1) >> shifts[None, :, None]) & 15  # (R, 8, C)
    return q.reshape(-1, qweight.shape[1]).long()


def _unpack_int32_cols(qweight: torch.Tensor, order=None) -> torch.Tensor:
    """(R, C) int32 packed along columns (nibble i -> column 8c + order[i]) -> (R, 8C) int64."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    q = (qweight.unsqueeze(-1) >> shifts) & 15  # (R, C, 8), [..., i] = nibble i
    if order is not None:
        inv = [0] * 8
        for i, col in enumerate(order):
            inv[col] = i
        q = q[..., inv]
    return q.reshape(qweight.shape[0], -1).long()


def _check_tensor(name: str, t, device: torch.device | None = None):
    _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    _check(t.device.type != "meta", f"{name} is on the meta device: importing reads the packed values, so it needs "
                                    "real tensors (load the checkpoint's tensors first)")
    _check(device is None or t.device == device, f"{name} is on {t.device}, qweight on {device}: "
                                                 "they must be on the same device")


def _check_int32(name: str, t: torch.Tensor, dim: int = 2):
    _check_tensor(name, t)
    _check(t.dtype == torch.int32, f"{name} must be int32 (packed 4-bit), got {t.dtype}", TypeError)
    _check(t.dim() == dim, f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_scales(name: str, s: torch.Tensor):
    _check_tensor(name, s)
    _check(s.dtype in (torch.float16, torch.bfloat16, torch.float32),
           f"{name} must be float16, bfloat16 or float32, got {s.dtype}", TypeError)
    _check(s.dim() == 2, f"{name} must be 2-D (groups, out_features), got shape {tuple(s.shape)}")


def gptq_unpack(qweight, qzeros, scales, g_idx=None):
    """GPTQ (v1, as vLLM/exllama read it) -> (q (K, N) int64, zeros (groups, N) int64 with the +1 applied,
    scales (groups, N) float32, g_idx (K,) int64, group_size)."""
    _check_int32("qweight", qweight)
    _check_int32("qzeros", qzeros)
    _check_scales("scales", scales)
    _check_tensor("qzeros", qzeros, qweight.device)
    _check_tensor("scales", scales, qweight.device)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    ng = scales.shape[0]
    _check(scales.shape[1] == n, f"scales must have shape (groups, {n}) to match qweight (K/8, N) = "
                                 f"{tuple(qweight.shape)}, got {tuple(scales.shape)}")
    _check(n % 8 == 0, f"out_features N={n} (qweight (K/8, N) = {tuple(qweight.shape)}) must be a multiple of 8: "
                       "GPTQ packs 8 zero points per int32 of qzeros")
    _check(qzeros.shape[0] == ng, f"qzeros has {qzeros.shape[0]} groups and scales {ng} (qzeros "
                                  f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)}): they must agree")
    _check(tuple(qzeros.shape) == (ng, n // 8),
           f"qzeros must have shape (groups, N/8) = ({ng}, {n // 8}), got {tuple(qzeros.shape)}")
    if g_idx is not None:
        _check_tensor("g_idx", g_idx, qweight.device)
        _check(g_idx.dtype in (torch.int32, torch.int64), f"g_idx must be int32 or int64, got {g_idx.dtype}", TypeError)
        _check(tuple(g_idx.shape) == (k,), f"g_idx must have shape (K,) = ({k},), got {tuple(g_idx.shape)}")
        g_idx = g_idx.long()
        _check(bool(((g_idx >= 0) & (g_idx < ng)).all()), f"g_idx values must lie in [0, {ng})")
        # GPTQ writes ceil(K / G) groups, the last one short when G does not divide K: name G and K
        counts = torch.bincount(g_idx, minlength=ng)
        g = int(counts.max())
        if not bool((counts == g).all()):
            if bool((counts[:-1] == g).all()) and int(counts[-1]) < g:
                raise ValueError(f"in_features K={k} is not a multiple of the group size {g} (from g_idx: its last "
                                 f"group has {int(counts[-1])} input features); thrifty's int4 kernels quantize whole "
                                 "groups")
            raise ValueError(f"g_idx must give every group the same number of input features, got "
                             f"{sorted(set(counts.tolist()))}")
    _check(ng >= 1 and k % ng == 0, f"scales has {ng} groups, which does not divide K={k} (from qweight): GPTQ "
                                    "writes ceil(K / group size) groups, so K must be a multiple of the group size")
    gs = k // ng
    if g_idx is None:
        g_idx = torch.arange(k, device=qweight.device) // gs
    q = _unpack_int32_rows(qweight)
    z = _unpack_int32_cols(qzeros) + 1  # stored nibble + 1: a stored 15 means zero point 16
    return q, z, scales.float(), g_idx, gs


def gptq_dequantize_reference(qweight, qzeros, scales, g_idx=None) -> torch.Tensor:
    """float32 (N, K): w[n, k] = (q[k, n] - (qzeros[g, n] + 1)) * scales[g, n], g = g_idx[k]."""
    q, z, s, g_idx, _ = gptq_unpack(qweight, qzeros, scales, g_idx)
    return ((q.float() - z[g_idx].float()) * s[g_idx]).t().contiguous()


def from_gptq_tensors(qweight, qzeros, scales, g_idx=None):
    """GPTQ -> thrifty W4 tensors (qweight uint8 (N, K/2), scales, zeros (N, K/G), perm or None, group_size)."""
    q, z, s, g_idx, gs = gptq_unpack(qweight, qzeros, scales, g_idx)
    k = q.shape[0]
    _check(gs % 32 == 0, f"GPTQ group size {gs} (K={k} / {s.shape[0]} groups) is not a multiple of 32, "
                         "which thrifty's int4 kernels need")
    perm = None
    trivial = torch.equal(g_idx, torch.arange(k, device=g_idx.device) // gs)
    if not trivial:  # act-order: reorder input features so that every group is contiguous
        counts = torch.bincount(g_idx, minlength=s.shape[0])
        _check(bool((counts == gs).all()), f"g_idx must assign exactly group_size={gs} input features to every group")
        perm = torch.argsort(g_idx, stable=True)
        q = q[perm]
    _check(bool((z <= 16).all()), "GPTQ zero points must lie in [1, 16]")
    return (pack_int4(q.t().contiguous()), s.t().contiguous(), z.t().float().contiguous(),
            perm, gs)


def awq_unpack(qweight, qzeros, scales):
    """AWQ (GEMM layout) -> (q (K, N) int64, zeros (groups, N) int64, scales (groups, N) float32, group_size)."""
    _check_int32("qweight", qweight)
    _check_int32("qzeros", qzeros)
    _check_scales("scales", scales)
    _check_tensor("qzeros", qzeros, qweight.device)
    _check_tensor("scales", scales, qweight.device)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    ng = scales.shape[0]
    _check(scales.shape[1] == n, f"scales must have shape (groups, {n}) to match qweight (K, N/8) = "
                                 f"{tuple(qweight.shape)}, got {tuple(scales.shape)}")
    _check(ng >= 1 and k % ng == 0, f"scales has {ng} groups, which does not divide K={k} (from qweight)")
    _check(tuple(qzeros.shape) == (ng, n // 8), f"qzeros must have shape (groups, N/8) = ({ng}, {n // 8}), "
                                                f"got {tuple(qzeros.shape)}")
    q = _unpack_int32_cols(qweight, AWQ_ORDER)
    z = _unpack_int32_cols(qzeros, AWQ_ORDER)
    return q, z, scales.float(), k // ng


def awq_dequantize_reference(qweight, qzeros, scales) -> torch.Tensor:
    """float32 (N, K): w[n, k] = (q[k, n] - z[k // G, n]) * scales[k // G, n]."""
    q, z, s, gs = awq_unpack(qweight, qzeros, scales)
    return ((q.float() - z.repeat_interleave(gs, 0).float()) * s.repeat_interleave(gs, 0)).t().contiguous()


def from_awq_tensors(qweight, qzeros, scales, group_size: int | None = None):
    if group_size is not None:
        _check_int32("qweight", qweight)
        k = qweight.shape[0]
        if group_size == -1:  # AutoAWQ's q_group_size -1: one group of all K input features
            group_size = k
        _check(group_size > 0, f"group_size must be a positive multiple of 32, -1 (one group of all K inputs) or "
                               f"None (from the shapes), got {group_size}")
        # K alone (qweight's rows) rules out the group size: say so, rather than the shape mismatch
        # (or groups-do-not-divide-K error) that the scales would report for it
        _check(k % group_size == 0, f"in_features K={k} (rows of qweight (K, N/8) = {tuple(qweight.shape)}) is not "
                                    f"a multiple of group_size={group_size} (AWQ quantizes whole groups of "
                                    "group_size input features)")
    q, z, s, gs = awq_unpack(qweight, qzeros, scales)
    if group_size is not None and group_size != gs:
        raise ValueError(f"group_size={group_size} does not match the shapes: qweight (K, N/8) = "
                         f"{tuple(qweight.shape)} has K={q.shape[0]} and scales {tuple(scales.shape)} has "
                         f"{s.shape[0]} groups, which means group size {gs} (for group_size={group_size}, qweight "
                         f"must have K = {s.shape[0] * group_size} rows)")
    _check(gs % 32 == 0, f"AWQ group size {gs} is not a multiple of 32, which thrifty's int4 kernels need")
    return pack_int4(q.t().contiguous()), s.t().contiguous(), z.t().float().contiguous(), gs


# ---- writers (for tests and for exporting): thrifty codes -> GPTQ / AWQ tensors ----
def _pack_int32_rows(q: torch.Tensor) -> torch.Tensor:
    r = q.shape[0] // 8
    q = q.reshape(r, 8, -1).to(torch.int64)
    out = torch.zeros(r, q.shape[2], dtype=torch.int64, device=q.device)
    for j in range(8):
        out |= q[:, j] << (4 * j)
    return (out - ((out >> 31) << 32)).to(torch.int32)  # two's complement view of the 32 bits


def _pack_int32_cols(q: torch.Tensor, order=None) -> torch.Tensor:
    order = order or tuple(range(8))
    q = q.reshape(q.shape[0], -1, 8).to(torch.int64)
    out = torch.zeros(q.shape[0], q.shape[1], dtype=torch.int64, device=q.device)
    for i, col in enumerate(order):
        out |= q[..., col] << (4 * i)
    return (out - ((out >> 31) << 32)).to(torch.int32)


def to_gptq_tensors(q_kn: torch.Tensor, zeros_plus1: torch.Tensor, scales: torch.Tensor):
    """q (K, N) codes, zero points (groups, N) in [1, 16], scales (groups, N) -> GPTQ qweight, qzeros, scales."""
    return _pack_int32_rows(q_kn), _pack_int32_cols(zeros_plus1 - 1), scales.half()


def to_awq_tensors(q_kn: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor):
    return _pack_int32_cols(q_kn, AWQ_ORDER), _pack_int32_cols(zeros, AWQ_ORDER), scales.half()
