"""GPTQ (Frantar et al., 2022): quantize a weight column by column, each column's rounding error
spread over the not-yet-quantized columns through the inverse Hessian of the layer's inputs.

    H    = 2 X^T X / n  (+ damp * mean(diag H) * I)        X: calibration inputs (tokens, K)
    Hinv = upper Cholesky factor of H^-1                  (torch.linalg)
    for each column k (in act-order: by decreasing diag H):
        q_k  = quant(w_k)                                  group params taken when a group starts
        err  = (w_k - q_k) / Hinv[k, k]
        w_j -= err * Hinv[k, j]   for j > k                (lazily, in blocks: the "lazy batch" update)

With act-order the groups are contiguous in the permuted order, which is exactly thrifty's W4 format
with a ``perm``: no g_idx gather in the kernels.
"""
from __future__ import annotations

import math

import torch

from thrifty.quant.formats import w4_group_params


def hessian_from_inputs(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Returns (sum of x^T x in float64, number of rows) for x (..., K): accumulate over batches, then
    H = 2 * sum / n."""
    x = x.reshape(-1, x.shape[-1]).double()
    return x.t() @ x, x.shape[0]


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, *, bits: int = 4, group_size: int = 128,
                  damp: float = 0.01, act_order: bool = True, block_size: int = 128):
    """GPTQ of w (N, K) given H (K, K) (= 2 X^T X / n).

    Returns (q, scales, zeros, perm):
      bits=4: q uint8 (N, K) codes in [0, 15] in the (possibly permuted) column order, scales/zeros (N, K/G);
      bits=8: q int8 (N, K), scales (N,), zeros None (symmetric per channel);
      perm: int64 (K,) column order (None without act-order): q[:, j] quantizes w[:, perm[j]].
    """
    n, k = w.shape
    if bits == 4 and (group_size <= 0 or k % group_size):
        raise ValueError(f"in_features K={k} is not a multiple of group_size={group_size}")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must have shape ({k}, {k}), got {tuple(hessian.shape)}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian holds inf or nan (were the calibration activations finite?)")
    W = w.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype, device=H.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as err:
        raise torch.linalg.LinAlgError(
            f"GPTQ: the damped Hessian (damp={damp}) is not positive definite ({err}); raise damp (0.01 to 0.1 is "
            "usual) or give more calibration tokens") from None

    if bits == 8:
        s8 = (W.abs().amax(1) / 127.0)
        s8 = torch.where(s8 > 0, s8, torch.ones_like(s8)).float().double()
        quant = lambda col, i: torch.clamp(torch.round(col / s8), -127, 127)  # noqa: E731
        deq = lambda qc, i: qc * s8  # noqa: E731
    Q = torch.zeros_like(W)
    ng = k // group_size if bits == 4 else 1
    S = torch.zeros(n, ng, dtype=torch.float32, device=W.device)
    Z = torch.zeros(n, ng, dtype=torch.float32, device=W.device)
    if bits == 4:
        block_size = max(group_size, block_size // group_size * group_size)  # groups never straddle blocks
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hi1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            if bits == 4:
                if (i1 + i) % group_size == 0:
                    g = (i1 + i) // group_size
                    s, z = w4_group_params(W1[:, i:i + group_size].float())
                    S[:, g], Z[:, g] = s, z
                    sd, zd = s.double(), z.double()
                qc = torch.clamp(torch.round(col / sd) + zd, 0, 15)
                dq = (qc - zd) * sd
            else:
                qc = quant(col, i)
                dq = deq(qc, i)
            Q[:, i1 + i] = qc
            err = (col - dq) / Hi1[i, i]
            W1[:, i:] -= err[:, None] * Hi1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    if bits == 4:
        return Q.to(torch.uint8), S.contiguous(), Z.contiguous(), perm
    if perm is not None:  # per-channel scales do not care about column order: undo the permutation
        Qo = torch.empty_like(Q)
        Qo[:, perm] = Q
        Q = Qo
    return Q.to(torch.int8), s8.float().contiguous(), None, None
