// y = x w^T (+ b) for a few rows of x, float32, AVX2 and FMA (and AVX-512 where the CPU has it): the
// decode step's matrix products on a CPU.
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

// ---- AVX-512, weights packed --------------------------------------------------------------------------
// Where the CPU has AVX-512 (32 vector registers), each weight is packed once into [N / 64, K, 64]: for a
// block of 64 output rows, their 64 values at k = 0, then at k = 1, ... one sequential stream. A tile of
// up to 6 input rows by the block's 64 outputs keeps 24 accumulators in registers; at each k, 4 vector
// reads of the weights feed 6 rows' products (each input value broadcast), and no horizontal sum is
// left to do. Reading several weight rows side by side from their own places in memory is slow (several
// streams, measured: docs/benchmarks.md, "Products of a few rows on the CPU"), hence the packing. Every
// y[m, n] is one fused multiply-add per k in order from k = 0, then the bias, whatever the tile it
// falls in: a row's bits never depend on its batch.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
namespace {

constexpr int BLOCK = 64, VECS = BLOCK / 16, MAX_TILE = 6;

template <int mr>
inline void packed_tile(const float* x, const float* block, const float* b, float* y, int64_t K, int64_t N,
                        int64_t m0, int64_t n0) {
  __m512 acc[mr][VECS];
#pragma GCC unroll 8
  for (int i = 0; i < mr; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < VECS; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = block + k * BLOCK;
    __m512 wv[VECS];
#pragma GCC unroll 4
    for (int j = 0; j < VECS; ++j) wv[j] = _mm512_loadu_ps(wk + 16 * j);
#pragma GCC unroll 8
    for (int i = 0; i < mr; ++i) {
      const __m512 xv = _mm512_set1_ps(x[(m0 + i) * K + k]);
#pragma GCC unroll 4
      for (int j = 0; j < VECS; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < mr; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < VECS; ++j) {
      __m512 v = acc[i][j];
      if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + n0 + 16 * j));
      _mm512_storeu_ps(y + (m0 + i) * N + n0 + 16 * j, v);
    }
}

inline void packed_rows(const float* x, const float* block, const float* b, float* y, int64_t K, int64_t N,
                        int64_t m, int mr, int64_t n) {
  switch (mr) {
    case 1: packed_tile<1>(x, block, b, y, K, N, m, n); break;
    case 2: packed_tile<2>(x, block, b, y, K, N, m, n); break;
    case 3: packed_tile<3>(x, block, b, y, K, N, m, n); break;
    case 4: packed_tile<4>(x, block, b, y, K, N, m, n); break;
    case 5: packed_tile<5>(x, block, b, y, K, N, m, n); break;
    default: packed_tile<6>(x, block, b, y, K, N, m, n); break;
  }
}

}  // namespace

torch::Tensor rows_linear_packed(const torch::Tensor& x, const torch::Tensor& wp, const c10::optional<torch::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && wp.dim() == 3 && wp.size(2) == BLOCK && x.size(1) == wp.size(1),
              "rows_linear_packed: x [M, K], packed w [N / 64, K, 64]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && wp.scalar_type() == at::kFloat, "rows_linear_packed: float32 only");
  TORCH_CHECK(x.is_contiguous() && wp.is_contiguous(), "rows_linear_packed: contiguous x and packed w");
  const int64_t M = x.size(0), K = x.size(1), N = wp.size(0) * BLOCK;
  const float* bp = nullptr;
  if (b.has_value() && b->defined()) {
    TORCH_CHECK(b->scalar_type() == at::kFloat && b->is_contiguous() && b->numel() == N, "rows_linear_packed: bias [N]");
    bp = b->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wpp = wp.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // the rows in tiles of at most MAX_TILE, as even as they split (8 rows: 4 + 4, not 6 + 2)
  const int64_t tiles = (M + MAX_TILE - 1) / MAX_TILE;
  at::parallel_for(0, N / BLOCK, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t m = 0;
      for (int64_t t = 0; t < tiles; ++t) {
        const int mr = static_cast<int>(M / tiles + (t < M % tiles ? 1 : 0));
        packed_rows(xp, wpp + blk * BLOCK * K, bp, yp, K, N, m, mr, blk * BLOCK);
        m += mr;
      }
    }
  });
  return y;
}
#pragma GCC pop_options

// [N, K] -> [N / 64, K, 64] (rows_linear_packed's layout); N a multiple of 64
torch::Tensor pack_weight(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) % BLOCK == 0 && w.scalar_type() == at::kFloat,
              "pack_weight: float32 [N, K], N a multiple of 64");
  return w.reshape({w.size(0) / BLOCK, BLOCK, w.size(1)}).permute({0, 2, 1}).contiguous();
}

bool has_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rows_linear", &rows_linear, "y = x w^T + b for a few rows");
  m.def("rows_linear_packed", &rows_linear_packed, "y = x w^T + b for a few rows, w packed (AVX-512)");
  m.def("pack_weight", &pack_weight, "w [N, K] in rows_linear_packed's layout");
  m.def("has_avx512", &has_avx512, "this CPU runs rows_linear_packed");
}
