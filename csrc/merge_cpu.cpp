// Fused in-place LSE merge on CPU: one pass over out/blk_out (the eager torch merge makes several,
// plus temporaries and a dtype promotion for bf16/fp16 blocks), parallel with at::parallel_for.
// Portable at::vec code, plus AVX2/F16C row kernels and SLEEF LSE math chosen at run time on x86-64.
#include "spattn.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)  // GCC's target pragmas/attributes
#include <immintrin.h>
#define SPATTN_X86_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
// SLEEF's 8-wide exp/log1p: libtorch_cpu exports them (torch's own AVX2 kernels use them), so the
// LSE math runs as fast and as accurately as torch's without building SLEEF here.
extern "C" __m256 Sleef_expf8_u10(__m256);
extern "C" __m256 Sleef_log1pf8_u10(__m256);
#pragma GCC pop_options
#endif

namespace spattn {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kTokChunk = 32;  // tokens per task: enough to fill vectors along the lse's S axis

// new_lse = logaddexp(a, b) the way torch computes it; weights exp(x - new_lse), with new_lse
// replaced by 0 where it is infinite so that a (-inf, -inf) row gives weights 0, never NaN.
inline void lse_weights(const fVec& a, const fVec& b, fVec& new_lse, fVec& wa, fVec& wb) {
  const fVec inf(std::numeric_limits<float>::infinity());
  const fVec zero(0.f);
  fVec mx = at::vec::maximum(a, b);
  fVec mn = at::vec::minimum(a, b);
  fVec lae = mx + (mn - mx).exp().log1p();
  fVec mx_inf = mx.abs() == inf;
  new_lse = fVec::blendv(lae, mx, mx_inf);  // +-inf max: the result is the max (no inf-inf)
  fVec safe = fVec::blendv(new_lse, zero, new_lse.abs() == inf);
  wa = (a - safe).exp();
  wb = (b - safe).exp();
}

// out_row = out_row * wa + blk_row * wb over one head_dim row.
template <typename scalar_t>
inline void scale_row(float* out, const scalar_t* blk, int64_t D, float wa, float wb) {
  const fVec va(wa), vb(wb);
  int64_t d = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; d + fVec::size() <= D; d += fVec::size()) {
      fVec o = fVec::loadu(out + d) * va + fVec::loadu(blk + d) * vb;
      o.store(out + d);
    }
  } else {
    using bVec = at::vec::Vectorized<scalar_t>;
    for (; d + bVec::size() <= D; d += bVec::size()) {
      auto [b0, b1] = at::vec::convert_to_float<scalar_t>(bVec::loadu(blk + d));
      fVec o0 = fVec::loadu(out + d) * va + b0 * vb;
      fVec o1 = fVec::loadu(out + d + fVec::size()) * va + b1 * vb;
      o0.store(out + d);
      o1.store(out + d + fVec::size());
    }
  }
  for (; d < D; ++d) out[d] = out[d] * wa + static_cast<float>(blk[d]) * wb;
}

#ifdef SPATTN_X86_AVX2
// The extension is built for baseline x86-64 (it must import anywhere), where at::vec is 128-bit and
// fp16 -> fp32 conversion is scalar bit twiddling. These row kernels are compiled for AVX2/F16C and
// chosen at run time when the CPU has them.
__attribute__((target("avx2,f16c"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,f16c"))) inline __m256 load8(const at::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bf16 = high half of fp32
}
__attribute__((target("avx2,f16c"))) inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((target("avx2,f16c"))) inline float load1(const float* p) { return *p; }
__attribute__((target("avx2,f16c"))) inline float load1(const at::BFloat16* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
__attribute__((target("avx2,f16c"))) inline float load1(const at::Half* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

template <typename scalar_t>
__attribute__((target("avx2,f16c"))) void scale_row_avx2(float* out, const scalar_t* blk, int64_t D, float wa,
                                                         float wb) {
  const __m256 va = _mm256_set1_ps(wa), vb = _mm256_set1_ps(wb);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {  // mul + mul + add (no FMA), as the torch reference rounds
    __m256 o = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(out + d), va), _mm256_mul_ps(load8(blk + d), vb));
    _mm256_storeu_ps(out + d, o);
  }
  for (; d < D; ++d) out[d] = out[d] * wa + load1(blk + d) * wb;
}

// lse_weights() for 8 lanes with AVX2 + SLEEF; same formula, same special cases.
__attribute__((target("avx2,f16c"))) inline void lse_weights_avx2(const float* a_p, const float* b_p, float* new_p,
                                                                 float* wa_p, float* wb_p) {
  const __m256 a = _mm256_loadu_ps(a_p), b = _mm256_loadu_ps(b_p);
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 mx = _mm256_max_ps(a, b), mn = _mm256_min_ps(a, b);
  const __m256 lae = _mm256_add_ps(mx, Sleef_log1pf8_u10(Sleef_expf8_u10(_mm256_sub_ps(mn, mx))));
  const __m256 mx_inf = _mm256_cmp_ps(_mm256_andnot_ps(sign, mx), inf, _CMP_EQ_OQ);
  // _mm256_max_ps/min_ps return their second operand when either is NaN, which would turn a NaN
  // running LSE finite (SDPA keeps a poisoned row NaN): put the NaN back where the inputs are unordered.
  const __m256 unord = _mm256_cmp_ps(a, b, _CMP_UNORD_Q);
  const __m256 nl = _mm256_blendv_ps(_mm256_blendv_ps(lae, mx, mx_inf), _mm256_add_ps(a, b), unord);
  const __m256 nl_inf = _mm256_cmp_ps(_mm256_andnot_ps(sign, nl), inf, _CMP_EQ_OQ);
  const __m256 safe = _mm256_blendv_ps(nl, _mm256_setzero_ps(), nl_inf);
  _mm256_storeu_ps(new_p, nl);
  _mm256_storeu_ps(wa_p, Sleef_expf8_u10(_mm256_sub_ps(a, safe)));
  _mm256_storeu_ps(wb_p, Sleef_expf8_u10(_mm256_sub_ps(b, safe)));
}

// Phase 1 over n <= kTokChunk entries of one (b, h) lse row.
__attribute__((target("avx2,f16c"))) void lse_row_avx2(float* l, const float* bl, int64_t n, float* pa, float* pb) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) lse_weights_avx2(l + i, bl + i, l + i, pa + i, pb + i);
  if (i < n) {  // tail through a padded copy
    float ta[8], tb[8], tn[8], twa[8], twb[8];
    std::fill(ta, ta + 8, 0.f);
    std::fill(tb, tb + 8, 0.f);
    std::copy(l + i, l + n, ta);
    std::copy(bl + i, bl + n, tb);
    lse_weights_avx2(ta, tb, tn, twa, twb);
    std::copy(tn, tn + (n - i), l + i);
    std::copy(twa, twa + (n - i), pa + i);
    std::copy(twb, twb + (n - i), pb + i);
  }
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

// out/lse may be strided views (the ring merges into slices of its running output); only their last
// dim must be dense. blk/blk_lse are contiguous.
struct Strides {
  int64_t ob, os, oh;  // out (B, S, H, D), D dense
  int64_t lb, lh;      // lse (B, H, S), S dense
};

template <typename scalar_t>
void merge_kernel(float* out, float* lse, const scalar_t* blk, const float* blk_lse, int64_t B,
                  int64_t S, int64_t H, int64_t D, Strides st) {
#ifdef SPATTN_X86_AVX2
  // SPATTN_MERGE_NO_AVX2=1 forces the portable path (tests cover both).
  const bool avx2 = cpu_has_avx2() && std::getenv("SPATTN_MERGE_NO_AVX2") == nullptr;
#else
  const bool avx2 = false;
#endif
  const int64_t chunks = (S + kTokChunk - 1) / kTokChunk;
  // grain: a task should move at least ~32k elements so thread wake-up cost stays small.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kTokChunk * H * D));
  at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> wa(H * kTokChunk), wb(H * kTokChunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks;
      const int64_t s0 = (task % chunks) * kTokChunk;
      const int64_t n = std::min(kTokChunk, S - s0);
      // Phase 1: lse rows are contiguous along S, so the logaddexp/exps vectorize there.
      for (int64_t h = 0; h < H; ++h) {
        float* l = lse + b * st.lb + h * st.lh + s0;
        const float* bl = blk_lse + (b * H + h) * S + s0;
        float* pa = wa.data() + h * kTokChunk;
        float* pb = wb.data() + h * kTokChunk;
#ifdef SPATTN_X86_AVX2
        if (avx2) {
          lse_row_avx2(l, bl, n, pa, pb);
          continue;
        }
#endif
        for (int64_t i = 0; i < n; i += fVec::size()) {
          const int cnt = static_cast<int>(std::min<int64_t>(fVec::size(), n - i));
          fVec nl, va, vb;
          lse_weights(fVec::loadu(l + i, cnt), fVec::loadu(bl + i, cnt), nl, va, vb);
          nl.store(l + i, cnt);
          va.store(pa + i, cnt);
          vb.store(pb + i, cnt);
        }
      }
      // Phase 2: one streaming pass over this chunk's output rows.
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row0 = ((b * S) + s0 + i) * H;
        float* orow = out + b * st.ob + (s0 + i) * st.os;
        for (int64_t h = 0; h < H; ++h) {
          float* o = orow + h * st.oh;
          const scalar_t* x = blk + (row0 + h) * D;
#ifdef SPATTN_X86_AVX2
          if (avx2) {
            scale_row_avx2<scalar_t>(o, x, D, wa[h * kTokChunk + i], wb[h * kTokChunk + i]);
            continue;
          }
#endif
          scale_row<scalar_t>(o, x, D, wa[h * kTokChunk + i], wb[h * kTokChunk + i]);
        }
      }
    }
  });
}

}  // namespace

void check_merge_args(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& blk_out,
                      const at::Tensor& blk_lse) {
  TORCH_CHECK(out.dim() == 4, "spattn merge: out must be (B, S, H, D), got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat, "spattn merge: out must be float32, got ", out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && blk_lse.scalar_type() == at::kFloat,
              "spattn merge: lse and blk_lse must be float32");
  TORCH_CHECK(blk_out.sizes() == out.sizes(), "spattn merge: blk_out ", blk_out.sizes(),
              " must have out's shape ", out.sizes());
  const auto B = out.size(0), S = out.size(1), H = out.size(2);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == S,
              "spattn merge: lse must be (B, H, S) = (", B, ", ", H, ", ", S, "), got ", lse.sizes());
  TORCH_CHECK(blk_lse.sizes() == lse.sizes(), "spattn merge: blk_lse ", blk_lse.sizes(),
              " must have lse's shape ", lse.sizes());
  TORCH_CHECK(out.stride(3) == 1 && lse.stride(2) == 1,
              "spattn merge: out and lse are updated in place and need a dense last dim (got strides ",
              out.strides(), " and ", lse.strides(), ")");
  TORCH_CHECK(blk_out.device() == out.device() && lse.device() == out.device() &&
                  blk_lse.device() == out.device(),
              "spattn merge: all tensors must be on one device");
}

void merge_cpu_(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& blk_out, const at::Tensor& blk_lse) {
  check_merge_args(out, lse, blk_out, blk_lse);
  TORCH_CHECK(out.device().is_cpu(), "spattn merge_cpu_: tensors must be on the CPU");
  // Read-only inputs may be views (e.g. a slice of a packed buffer): a copy is cheaper than the
  // strided kernel we would otherwise need, and is a no-op when already contiguous.
  const at::Tensor blk = blk_out.contiguous();
  const at::Tensor blse = blk_lse.contiguous();
  float* o = out.data_ptr<float>();
  float* l = lse.data_ptr<float>();
  const float* bl = blse.const_data_ptr<float>();
  const int64_t B = out.size(0), S = out.size(1), H = out.size(2), D = out.size(3);
  const Strides st{out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1)};
  switch (blk.scalar_type()) {
    case at::kFloat: return merge_kernel(o, l, blk.const_data_ptr<float>(), bl, B, S, H, D, st);
    case at::kBFloat16: return merge_kernel(o, l, blk.const_data_ptr<at::BFloat16>(), bl, B, S, H, D, st);
    case at::kHalf: return merge_kernel(o, l, blk.const_data_ptr<at::Half>(), bl, B, S, H, D, st);
    default: TORCH_CHECK(false, "spattn merge: blk_out must be float32, bfloat16 or float16, got ", blk.scalar_type());
  }
}

}  // namespace spattn
