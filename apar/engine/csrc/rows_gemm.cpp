// y = x w^T (+ b) for a few rows of x, float32, AVX2 and FMA: the decode step's matrix products on a CPU.
//
// Why (docs/design.md, "Products of a few rows on the CPU"): the BLAS torch ships multiplies 2 to 16 rows
// about 2-3x slower than one, while a step of a few rows is bound by reading the weights once, so rows
// should be nearly free. Here every weight row is read from memory once a call, then from L1 for each
// further group of 8 input rows.
//
// Every y[m, n] is one fixed sequence of operations (eight lanes over k in order, a fixed horizontal sum,
// the k tail in order, then the bias) whatever the number of rows, the row's place among them or the
// thread: a row's result never depends on what else is in the batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

// input rows multiplied by one weight row at a time: MR accumulators in registers, the weight row read
// once from memory as one sequential stream (measured faster than tiles of 2 or 4 weight rows, whose
// several streams the prefetcher serves worse: docs/benchmarks.md, "Products of a few rows on the CPU")
constexpr int MR = 8;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// rows [m0, m0 + mr) of x against weight row n. The loops over mr are unrolled so that the compiler keeps
// the accumulators in registers (without the pragmas GCC stored them to the stack every iteration).
template <int mr>
inline void tile(const float* x, const float* w, const float* b, float* y, int64_t K, int64_t N, int64_t m0,
                 int64_t n) {
  __m256 acc[mr];
#pragma GCC unroll 8
  for (int i = 0; i < mr; ++i) acc[i] = _mm256_setzero_ps();
  const float* wn = w + n * K;
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 wv = _mm256_loadu_ps(wn + k);
#pragma GCC unroll 8
    for (int i = 0; i < mr; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (m0 + i) * K + k), wv, acc[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < mr; ++i) {
    const float* xm = x + (m0 + i) * K;
    float v = hsum(acc[i]);
    for (int64_t k = K8; k < K; ++k) v += xm[k] * wn[k];
    y[(m0 + i) * N + n] = b ? v + b[n] : v;
  }
}

// the last M % MR rows
template <int r>
inline void rest(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t K, int64_t N,
                 int64_t m, int64_t n) {
  if constexpr (r > 0) {
    if (M - m == r) tile<r>(x, w, b, y, K, N, m, n);
    else rest<r - 1>(x, w, b, y, M, K, N, m, n);
  }
}

}  // namespace

torch::Tensor rows_linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "rows_linear: x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rows_linear: float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "rows_linear: contiguous x and w");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* bp = nullptr;
  if (b.has_value() && b->defined()) {
    TORCH_CHECK(b->scalar_type() == at::kFloat && b->is_contiguous() && b->numel() == N, "rows_linear: bias [N]");
    bp = b->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      int64_t m = 0;
      for (; m + MR <= M; m += MR) tile<MR>(xp, wp, bp, yp, K, N, m, n);
      rest<MR - 1>(xp, wp, bp, yp, M, K, N, m, n);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("rows_linear", &rows_linear, "y = x w^T + b for a few rows"); }
