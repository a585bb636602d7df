// Torch-free fused cross-entropy kernels, one copy per ISA level (see common/cpu_isa.h).
#pragma once
#include "common/cpu_isa.h"
#include "common/loss_params.h"

THRIFTY_DECLARE_CPU_KERNEL(void, ce_fwd, (const ::thrifty::CeFwdParams& p))
THRIFTY_DECLARE_CPU_KERNEL(void, ce_grad, (const ::thrifty::CeGradParams& p))
