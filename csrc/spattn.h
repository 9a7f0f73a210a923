// Shared declarations for spattn._C (one header so the translation units stay few and small).
#pragma once

#include <ATen/ATen.h>

namespace spattn {

// Bumped whenever the Python <-> C++ contract changes; spattn/_ext.py refuses a mismatching build.
constexpr int kAbiVersion = 1;

// In-place LSE merge of a block result into the running (out, lse); see merge_cpu.cpp.
void merge_cpu_(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& blk_out, const at::Tensor& blk_lse);

// Shape/dtype/layout checks shared by the CPU and CUDA merges.
void check_merge_args(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& blk_out,
                      const at::Tensor& blk_lse);

#ifdef SPATTN_WITH_CUDA
void merge_cuda_(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& blk_out, const at::Tensor& blk_lse);
#endif

}  // namespace spattn
