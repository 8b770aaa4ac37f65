// y = x w^T (+ b) for a few rows of x, float32, AVX2 and FMA: the decode step's matrix products on a CPU.
//
// Why (docs/design.md, "Products of a few rows on the CPU"): the BLAS torch ships multiplies 2 to 16 rows
// about 2-3x slower than one, while a step of a few rows is bound by reading the weights once, so rows
// should be nearly free. Here every weight row is read from memory once a call, then from L1 for each
// further group of input rows.
//
// Every y[m, n] is one fixed sequence of operations (eight lanes over k in order, a fixed horizontal sum,
// the k tail in order, then the bias) whatever the number of rows, the row's place among them or the
// thread: a row's result never depends on what else is in the batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t NR = 4;  // weight rows per tile (their K floats stay in L1 while every row group reads them)
// input rows per group: NR x MR = 12 accumulators stay in registers (the loops are unrolled so that the
// compiler keeps them there; without the pragmas GCC stored them to the stack every iteration)
constexpr int64_t MR = 3;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float tail(const float* x, const float* w, int64_t k0, int64_t K, float acc) {
  for (int64_t k = k0; k < K; ++k) acc += x[k] * w[k];
  return acc;
}

// rows [m0, m0 + mr) of x against weight rows [n0, n0 + nr); mr <= MR, nr <= NR
template <int mr, int nr>
inline void tile(const float* x, const float* w, const float* b, float* y, int64_t K, int64_t N, int64_t m0,
                 int64_t n0) {
  __m256 acc[mr][nr];
#pragma GCC unroll 4
  for (int i = 0; i < mr; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < nr; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[nr];
#pragma GCC unroll 4
    for (int j = 0; j < nr; ++j) wv[j] = _mm256_loadu_ps(w + (n0 + j) * K + k);
#pragma GCC unroll 4
    for (int i = 0; i < mr; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + (m0 + i) * K + k);
#pragma GCC unroll 4
      for (int j = 0; j < nr; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < mr; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < nr; ++j) {
      float v = tail(x + (m0 + i) * K, w + (n0 + j) * K, K8, K, hsum(acc[i][j]));
      y[(m0 + i) * N + n0 + j] = b ? v + b[n0 + j] : v;
    }
}

template <int nr>
inline void column(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t K, int64_t N,
                   int64_t n0) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile<MR, nr>(x, w, b, y, K, N, m, n0);
  if (M - m == 2) tile<2, nr>(x, w, b, y, K, N, m, n0);
  if (M - m == 1) tile<1, nr>(x, w, b, y, K, N, m, n0);
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
  const int64_t tiles = (N + NR - 1) / NR;
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * NR;
      switch (std::min<int64_t>(NR, N - n0)) {
        case 4: column<4>(xp, wp, bp, yp, M, K, N, n0); break;
        case 3: column<3>(xp, wp, bp, yp, M, K, N, n0); break;
        case 2: column<2>(xp, wp, bp, yp, M, K, N, n0); break;
        default: column<1>(xp, wp, bp, yp, M, K, N, n0); break;
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("rows_linear", &rows_linear, "y = x w^T + b for a few rows"); }
