"""Fused optimizers: drop-ins for torch.optim with one multi-tensor pass per step.

- :class:`AdamW`: torch.optim.AdamW's math; optional float32 master weights for bf16/fp16
  params, fused global grad clipping, inf/nan step skipping (GradScaler compatible), lr as tensor.
- :class:`AdamW8bit`: the same with block-wise 8-bit moments (bitsandbytes dynamic maps).
- :class:`Lion`: sign-momentum optimizer with one state tensor.
"""
from thrifty.optim.adamw import AdamW, AdamW8bit
from thrifty.optim.lion import Lion

__all__ = ["AdamW", "AdamW8bit", "Lion"]
