// Device guard for the CUDA glue (.cpp files, which see ATen; the .cu kernels stay torch-free).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

namespace thrifty::cuda {

// The device to make current for an op: the tensor's GPU, or none when the tensor is on the CPU.
// A CPU tensor reaches the CUDA kernel of an op when another argument is on the GPU; a plain
// CUDAGuard would then throw its own "non-CUDA DeviceType" error, while no guard lets the op's
// argument checks name the mismatched argument. Use: `const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(x));`
inline std::optional<c10::Device> cuda_device_of(const at::Tensor& t) {
  return t.is_cuda() ? std::optional<c10::Device>(t.device()) : std::nullopt;
}

}  // namespace thrifty::cuda
