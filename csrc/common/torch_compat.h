// What the torch being built against offers, for code that must also build against older torch.
#pragma once
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

// at::mm(a, b, out_dtype): bf16/f16 inputs, float32 output, CUDA only (torch >= 2.8).
#if defined(TORCH_VERSION_MAJOR) && (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8))
#define THRIFTY_HAVE_MM_OUT_DTYPE 1
#else
#define THRIFTY_HAVE_MM_OUT_DTYPE 0
#endif
