// Torch-free fused optimizer kernel cores, one copy per ISA level (see common/cpu_isa.h).
#pragma once
#include "common/cpu_isa.h"
#include "common/optim_params.h"

// One multi-tensor optimizer step (AdamW, 8-bit AdamW or Lion by p.kind): one parallel pass over the
// chunks of every tensor of the table.
THRIFTY_DECLARE_CPU_KERNEL(void, optim_step, (const ::thrifty::OptimStepParams& p))
// Per-chunk float32 sums of squares of every tensor's grad into p.partial (fixed chunks: deterministic).
THRIFTY_DECLARE_CPU_KERNEL(void, optim_l2norm_partials, (const ::thrifty::L2NormParams& p))
