// Torch-free kernel cores of thrifty.linear, one copy per ISA level (see common/cpu_isa.h).
#pragma once
#include "common/cpu_isa.h"
#include "common/linear_params.h"

// y = x @ weight.T (+ bias) for p.M <= kLinearGemvMaxM rows: the bandwidth-bound GEMV of decoding.
THRIFTY_DECLARE_CPU_KERNEL(void, linear_gemv_fwd, (const ::thrifty::LinearParams& p))
