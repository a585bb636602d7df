// Torch-free rotary-embedding kernel core, one copy per ISA level (see common/cpu_isa.h).
#pragma once
#include "common/cpu_isa.h"
#include "common/rotary_params.h"

THRIFTY_DECLARE_CPU_KERNEL(void, rotary_embedding_fwd, (const ::thrifty::RotaryParams& p))
