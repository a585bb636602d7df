// Torch-free SwiGLU kernel cores, one copy per ISA level (see common/cpu_isa.h).
#pragma once
#include "common/activation_params.h"
#include "common/cpu_isa.h"

THRIFTY_DECLARE_CPU_KERNEL(void, swiglu_fwd, (const ::thrifty::SwigluParams& p))
THRIFTY_DECLARE_CPU_KERNEL(void, swiglu_bwd, (const ::thrifty::SwigluParams& p))
