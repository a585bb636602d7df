"""Quantization toolkit: formats and importers (GPTQ, AWQ), RTN and GPTQ quantizers, whole-model
quantization with safetensors save/load, and the `thrifty quantize` CLI (thrifty.quant.cli).
Layers: thrifty.nn.QuantLinear; ops: thrifty.ops.quant_linear / quantize_per_token / int8_linear."""
from thrifty.quant.formats import (FORMAT_VERSION, dequantize_reference, pack_int4, quantize_rtn_w4,
                                   quantize_rtn_w8, to_kernel_layout, unpack_int4)
from thrifty.quant.gptq import gptq_quantize
from thrifty.quant.model import (QuantConfig, load_quantized, quantize_model, save_quantized, smooth_fold)

__all__ = ["FORMAT_VERSION", "QuantConfig", "quantize_model", "save_quantized", "load_quantized", "smooth_fold",
           "gptq_quantize", "pack_int4", "unpack_int4", "quantize_rtn_w4", "quantize_rtn_w8", "to_kernel_layout",
           "dequantize_reference"]
