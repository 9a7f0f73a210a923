// Fused in-place LSE merge on CUDA: one warp per (token, head) row. Lanes read the row's two LSEs,
// agree on the weights, sync, then lane 0 writes the new LSE, so no lane reads an updated value.
// Compiled in CI for sm_80/sm_90 so it cannot rot; not auto-selected until validated on a GPU
// (spattn/_ext.py registers it for explicit use as merge_(..., impl="cuda")).
#include "spattn.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace spattn {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename scalar_t>
__global__ void merge_kernel(float* __restrict__ out, float* __restrict__ lse, const scalar_t* __restrict__ blk,
                             const float* __restrict__ blk_lse, int64_t rows, int64_t S, int64_t H, int64_t D,
                             int64_t ob, int64_t os, int64_t oh, int64_t lb, int64_t lh) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;  // whole warp leaves together: row is uniform across the warp
  // row = (b * S + s) * H + h ; lse index = (b * H + h) * S + s
  const int64_t h = row % H, bs = row / H, s = bs % S, b = bs / S;
  const int64_t li = b * lb + h * lh + s;  // out/lse may be strided views with a dense last dim
  const float a = lse[li], c = blk_lse[(b * H + h) * S + s];
  const float mx = fmaxf(a, c), mn = fminf(a, c);
  const float new_lse = isinf(mx) ? mx : mx + log1pf(expf(mn - mx));
  const float safe = isinf(new_lse) ? 0.f : new_lse;
  const float wa = expf(a - safe), wb = expf(c - safe);
  __syncwarp();
  if (lane == 0) lse[li] = new_lse;
  float* o = out + b * ob + s * os + h * oh;
  const scalar_t* x = blk + row * D;
  for (int64_t d = lane; d < D; d += 32) o[d] = o[d] * wa + static_cast<float>(x[d]) * wb;
}

}  // namespace

void merge_cuda_(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& blk_out, const at::Tensor& blk_lse) {
  check_merge_args(out, lse, blk_out, blk_lse);
  TORCH_CHECK(out.is_cuda(), "spattn merge_cuda_: tensors must be on a CUDA device");
  const at::Tensor blk = blk_out.contiguous();
  const at::Tensor blse = blk_lse.contiguous();
  const int64_t S = out.size(1), H = out.size(2), D = out.size(3);
  const int64_t rows = out.size(0) * S * H;
  if (rows == 0) return;
  c10::cuda::CUDAGuard guard(out.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(kWarpsPerBlock * 32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, blk.scalar_type(), "spattn_merge_cuda", [&] {
    merge_kernel<scalar_t><<<grid, block, 0, stream>>>(out.data_ptr<float>(), lse.data_ptr<float>(),
                                                        blk.const_data_ptr<scalar_t>(), blse.const_data_ptr<float>(),
                                                        rows, S, H, D, out.stride(0), out.stride(1),
                                                        out.stride(2), lse.stride(0), lse.stride(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace spattn
