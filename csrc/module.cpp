// The Python module thrifty._C: loading it registers every op (static initialisers in
// the other translation units); the functions here report how it was built and pick the
// CPU ISA level.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <ATen/Parallel.h>

#include "common/cpu_isa.h"
#include "common/parallel.h"

#ifdef THRIFTY_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/quant/quant_launch.h"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "thrifty's compiled kernels (ops are under torch.ops.thrifty)";
  // Reads THRIFTY_CPU_ISA now, so a bad value fails the import instead of the first kernel call.
  thrifty::cpu_isa_current();
  // Likewise THRIFTY_CPU_BF16_DOT: a bad value fails the import, not thrifty.info() or the first bf16
  // attention / quant_linear call.
  thrifty::cpu_use_bf16_dot();
  m.def("build_info", [] {
    py::dict d;
    d["torch_version"] = THRIFTY_TORCH_VERSION;
    d["git"] = THRIFTY_GIT;
    d["cpu_isa_compiled"] = THRIFTY_ISA_LIST;
#ifdef THRIFTY_WITH_CUDA
    d["cuda"] = true;
    d["cuda_version"] = THRIFTY_CUDA_VERSION;
    d["cuda_archs"] = THRIFTY_CUDA_ARCHS;
#else
    d["cuda"] = false;
    d["cuda_version"] = py::none();
    d["cuda_archs"] = "";
#endif
#ifdef THRIFTY_FAST_BUILD
    d["fast_build"] = true;
#else
    d["fast_build"] = false;
#endif
#ifdef THRIFTY_EMULATED_AVX512
    d["emulated_avx512"] = true;  // avx512 levels run SIMDe's emulation on AVX2 (a test build)
#else
    d["emulated_avx512"] = false;
#endif
    return d;
  }, "How this extension was built: torch version, CUDA version and architectures, CPU ISA levels.");
  m.def("cpu_isa_detected", [] { return std::string(thrifty::cpu_isa_name(thrifty::cpu_isa_detected())); },
        "The best CPU ISA level that both this CPU and this build have.");
  m.def("cpu_isa_available", [] {
    std::vector<std::string> out;
    for (auto isa : thrifty::cpu_isa_available()) out.emplace_back(thrifty::cpu_isa_name(isa));
    return out;
  }, "CPU ISA levels usable here, lowest first.");
  m.def("cpu_isa", [] { return std::string(thrifty::cpu_isa_name(thrifty::cpu_isa_current())); },
        "The CPU ISA level the kernels use now.");
  m.def("set_cpu_isa", [](const std::string& name) {
    return std::string(thrifty::cpu_isa_name(thrifty::set_cpu_isa(name)));
  }, py::arg("name"), "Switch the CPU kernels to ISA level `name` for the whole process (safe while other "
                      "threads run ops); returns the previous level. "
                      "Raises ValueError for unknown levels or levels this CPU lacks.");
  m.def("cpu_uses_bf16_dot", [] { return thrifty::cpu_use_bf16_dot(); },
        "Whether kernels with a VDPBF16PS and a float32 FMA path (bf16 attention forward, quant_linear) take the "
        "VDPBF16PS one at the avx512_bf16 level now.");
  m.def("set_cpu_bf16_dot", [](const std::string& mode) { return thrifty::set_cpu_bf16_dot(mode); },
        py::arg("mode"), "'auto' (VDPBF16PS unless the CPU has AMX-BF16, where it is the slower path), "
                         "'on' or 'off', for the whole process; returns the previous mode. Raises ValueError for "
                         "other names.");
#ifdef THRIFTY_WITH_CUDA
  // Reads THRIFTY_CUDA_QUANT_MMA now, so a bad value fails the import.
  thrifty::cuda::quant_mma_enabled();
  m.def("cuda_quant_mma", [] { return thrifty::cuda::quant_mma_enabled(); },
        "Whether CUDA quant_linear runs W4A16 with bf16/f16 x and M <= 32 on the tensor-core kernel now.");
  m.def("set_cuda_quant_mma", [](const std::string& mode) { return thrifty::cuda::set_quant_mma(mode); },
        py::arg("mode"), "'on' (the default) or 'off' (the GEMV for M <= 8, dequantize + cuBLAS above); "
                         "returns the previous mode. Raises ValueError for other names.");
#endif
  m.def("parallel_threads_used", [](int64_t items) {
    py::gil_scoped_release no_gil;
    return thrifty::parallel_threads_used(items);
  }, py::arg("items") = 64,
     "How many threads a thrifty parallel loop over `items` equal work items ran on "
     "(1 means the kernels are not using ATen's thread pool).");
}
