// Run-time CPU ISA selection for the torch-free kernel cores in csrc/cpu/.
//
// Every csrc/cpu/**/*_kernel.cpp is compiled once per level (see CMakeLists.txt) inside
// namespace thrifty::cpu::<level>; THRIFTY_CPU_DISPATCH calls the copy for the level in
// use. The level in use starts as the best one the CPU (cpuid) and the build both have,
// lowered by the environment variable THRIFTY_CPU_ISA (a cap: a level above what the machine
// has leaves the best one in use; an unknown name is an error), and can be changed at run
// time with set_cpu_isa() (tests run every level the machine has).
#pragma once
#include <string>
#include <vector>

namespace thrifty {

enum class CpuIsa : int { scalar = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };

const char* cpu_isa_name(CpuIsa isa);
// Best level this CPU supports (whatever was compiled).
CpuIsa cpu_isa_detected();
// Levels compiled into this build and supported by this CPU, lowest first.
std::vector<CpuIsa> cpu_isa_available();
// The level kernels use now.
CpuIsa cpu_isa_current();
// Parses a name ("scalar", "avx2", "avx512", "avx512_bf16"); throws on unknown names
// and on levels this CPU or this build lacks. Returns the previous level.
CpuIsa set_cpu_isa(const std::string& name);

// Whether the CPU has AMX-BF16 tile instructions (Intel Sapphire Rapids and later; cpuid leaf 7, EDX
// bit 22). thrifty does not use AMX; it matters for the choice below.
bool cpu_has_amx_bf16();
// Whether the CPU has AVX512-VBMI (byte permutes across a whole register: Ice Lake and later, AMD Zen 4;
// not Skylake-X or Cooper Lake). The avx512_bf16 level's 8-bit optimizer dequantizes with it where present.
bool cpu_has_avx512_vbmi();
// Kernels with both a VDPBF16PS path and a widen-to-float32 FMA path at the avx512_bf16 level (the
// bf16 attention forward, quant_linear with bf16 x) take the VDPBF16PS one when this is true. Mode
// "auto" (the default): true unless the CPU has AMX-BF16. On those Intel cores VDPBF16PS issues at
// half the rate of float32 FMA (the same multiply-adds per cycle, plus the pair packing), and the
// VDPBF16PS attention forward ran at 0.61-0.75x the FMA one; on AMD Zen 4 it has twice FMA's rate and
// ran 1.6-1.75x (bench/RESULTS.md). "on" / "off" force it (tests run both). Starts as the environment
// variable THRIFTY_CPU_BF16_DOT says (auto, on, off), else auto.
bool cpu_use_bf16_dot();
// Sets the mode ("auto", "on", "off"); returns the previous one. Throws on other names.
std::string set_cpu_bf16_dot(const std::string& mode);

}  // namespace thrifty

// Declares `ret fn args` in every ISA namespace. Use in a family's kernels header.
#define THRIFTY_DECLARE_CPU_KERNEL(ret, fn, args) \
  namespace thrifty::cpu::scalar { ret fn args; }      \
  namespace thrifty::cpu::avx2 { ret fn args; }        \
  namespace thrifty::cpu::avx512 { ret fn args; }      \
  namespace thrifty::cpu::avx512_bf16 { ret fn args; }

#if defined(__x86_64__) || defined(_M_X64)
#define THRIFTY_CPU_DISPATCH(fn, ...)                                                 \
  [&]() {                                                                             \
    switch (::thrifty::cpu_isa_current()) {                                           \
      case ::thrifty::CpuIsa::avx512_bf16: return ::thrifty::cpu::avx512_bf16::fn(__VA_ARGS__); \
      case ::thrifty::CpuIsa::avx512: return ::thrifty::cpu::avx512::fn(__VA_ARGS__); \
      case ::thrifty::CpuIsa::avx2: return ::thrifty::cpu::avx2::fn(__VA_ARGS__);     \
      default: return ::thrifty::cpu::scalar::fn(__VA_ARGS__);                        \
    }                                                                                 \
  }()
#else
#define THRIFTY_CPU_DISPATCH(fn, ...) ::thrifty::cpu::scalar::fn(__VA_ARGS__)
#endif
