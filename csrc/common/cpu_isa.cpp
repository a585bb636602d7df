#include "common/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace thrifty {
namespace {

bool cpu_has(CpuIsa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
#if defined(THRIFTY_EMULATED_AVX512)
  // Test build (CMake THRIFTY_EMULATE_AVX512): the avx512 levels are AVX2 code running SIMDe's
  // emulation of the AVX-512 intrinsics, so an AVX2 CPU runs them.
  if (isa == CpuIsa::avx512 || isa == CpuIsa::avx512_bf16) return cpu_has(CpuIsa::avx2);
#endif
  switch (isa) {
    case CpuIsa::scalar:
      return true;
    case CpuIsa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuIsa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case CpuIsa::avx512_bf16:
      return cpu_has(CpuIsa::avx512) && __builtin_cpu_supports("avx512bf16") &&
             __builtin_cpu_supports("avx512vnni");
  }
  return false;
#else
  return isa == CpuIsa::scalar;
#endif
}

bool compiled(CpuIsa isa) {
  const std::string list = THRIFTY_ISA_LIST;  // e.g. "scalar,avx2,avx512,avx512_bf16"
  const std::string name = cpu_isa_name(isa);
  size_t pos = 0;
  while (pos <= list.size()) {
    size_t end = list.find(',', pos);
    if (end == std::string::npos) end = list.size();
    if (list.compare(pos, end - pos, name) == 0) return true;
    pos = end + 1;
  }
  return false;
}

CpuIsa parse(const std::string& name) {
  for (int i = 0; i <= 3; ++i)
    if (name == cpu_isa_name(static_cast<CpuIsa>(i))) return static_cast<CpuIsa>(i);
  throw std::invalid_argument("THRIFTY_CPU_ISA / set_cpu_isa: unknown ISA level '" + name +
                              "'; expected one of scalar, avx2, avx512, avx512_bf16");
}

CpuIsa checked(const std::string& name) {
  CpuIsa isa = parse(name);
  if (!compiled(isa) || !cpu_has(isa))
    throw std::invalid_argument(std::string("THRIFTY_CPU_ISA / set_cpu_isa: level '") + name +
                                "' is not available here (this CPU and build offer up to '" +
                                cpu_isa_name(cpu_isa_detected()) + "')");
  return isa;
}

// THRIFTY_CPU_ISA caps the level: the best level this CPU and build have that is not above
// the one named (avx512 on an avx2-only machine runs avx2). Unknown names are an error.
CpuIsa capped(const std::string& name) {
  const CpuIsa cap = parse(name);
  CpuIsa best = CpuIsa::scalar;
  for (int i = 0; i <= static_cast<int>(cap); ++i) {
    auto isa = static_cast<CpuIsa>(i);
    if (compiled(isa) && cpu_has(isa)) best = isa;
  }
  return best;
}

std::atomic<int>& current() {
  static std::atomic<int> level([] {
    const char* env = std::getenv("THRIFTY_CPU_ISA");
    if (env != nullptr && env[0] != '\0') return static_cast<int>(capped(env));
    return static_cast<int>(cpu_isa_detected());
  }());
  return level;
}

const char* const kBf16DotModes[] = {"auto", "on", "off"};

int parse_bf16_dot(const std::string& mode) {
  for (int i = 0; i < 3; ++i)
    if (mode == kBf16DotModes[i]) return i;
  throw std::invalid_argument("THRIFTY_CPU_BF16_DOT / set_cpu_bf16_dot: unknown mode '" + mode +
                              "'; expected one of auto, on, off");
}

std::atomic<int>& bf16_dot_mode() {
  static std::atomic<int> mode([] {
    const char* env = std::getenv("THRIFTY_CPU_BF16_DOT");
    return env != nullptr && env[0] != '\0' ? parse_bf16_dot(env) : 0;
  }());
  return mode;
}

}  // namespace

bool cpu_has_amx_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) != 0 && ((d >> 22) & 1u) != 0;
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512_vbmi() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = __builtin_cpu_supports("avx512vbmi");
  return has;
#else
  return false;
#endif
}

bool cpu_use_bf16_dot() {
  const int mode = bf16_dot_mode().load(std::memory_order_relaxed);
  return mode == 1 || (mode == 0 && !cpu_has_amx_bf16());
}

std::string set_cpu_bf16_dot(const std::string& mode) {
  return kBf16DotModes[bf16_dot_mode().exchange(parse_bf16_dot(mode))];
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::scalar: return "scalar";
    case CpuIsa::avx2: return "avx2";
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx512_bf16: return "avx512_bf16";
  }
  return "unknown";
}

CpuIsa cpu_isa_detected() {
  for (int i = 3; i > 0; --i) {
    auto isa = static_cast<CpuIsa>(i);
    if (compiled(isa) && cpu_has(isa)) return isa;
  }
  return CpuIsa::scalar;
}

std::vector<CpuIsa> cpu_isa_available() {
  std::vector<CpuIsa> out;
  for (int i = 0; i <= 3; ++i) {
    auto isa = static_cast<CpuIsa>(i);
    if (compiled(isa) && cpu_has(isa)) out.push_back(isa);
  }
  return out;
}

CpuIsa cpu_isa_current() { return static_cast<CpuIsa>(current().load(std::memory_order_relaxed)); }

CpuIsa set_cpu_isa(const std::string& name) {
  CpuIsa isa = checked(name);
  return static_cast<CpuIsa>(current().exchange(static_cast<int>(isa)));
}

}  // namespace thrifty
