// Torch-free cross-entropy chunk kernel, one copy per ISA level (see common/cpu_isa.h).
#pragma once
#include "common/cpu_isa.h"
#include "common/loss_params.h"

THRIFTY_DECLARE_CPU_KERNEL(void, ce_chunk, (const ::thrifty::CeChunkParams& p))
