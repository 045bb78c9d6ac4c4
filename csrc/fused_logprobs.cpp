// fasthint native CPU row kernels for the chunked log-prob / policy-loss path.
//
// The chunked path (kernels/fasthint_kernels/chunked.py) computes a chunk of logits with one BLAS
// call, Z = H W^T  [rows, V], and then needs, per row (z = (Z + b) / T, y the target):
//
//   lse = log sum_v exp z_v,   logp_y = z_y - lse,   entropy = -sum_v p_v (z_v - lse),  p = exp(z - lse)
//   dz_v = g (1[v=y] - p_v) - e p_v (z_v - lse + entropy),  then / T      (g = dL/dlogp, e = dL/dentropy)
//
// In torch every step is its own pass over the [rows, V] workspace in memory (add, div, amax, sub,
// exp, sum, div, gather, xlogy, sum, mul, scatter, div). Here each row is handled by one thread:
//   softmax_stats_: pass 1 walks the row in 2048-column blocks that stay in L1: scale and bias in
//                   place, block max, block sum of exp, combined online (m, s) across blocks;
//                   pass 2 (only for the entropy) reads the row once more.
//   logit_grad_:    one pass, z -> dz in place (p recomputed from z and lse, so log p is free).
// Memory: nothing beyond the caller's workspace and O(rows) outputs. Accumulation in fp32 (double
// for the row sums). OpenMP (ATen's intra-op pool, at::parallel_for) across rows.
// exp is a range-reduced polynomial (|rel err| < 2e-7, flushes below exp(-87.3) to 0) written so
// that the compiler vectorises it (no libm call inside the loops).
#include <ATen/Parallel.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

namespace {

constexpr int64_t kBlock = 2048;
constexpr float kLo = -87.3f, kHi = 88.0f;

inline float fast_exp(float x) {
  // exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (Cephes expf polynomial)
  if (x < kLo) return 0.0f;
  x = x > kHi ? kHi : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kLanes = 8;
inline __m256 exp8(__m256 x) {  // fast_exp, 8 lanes
  const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(kLo), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kLo)), _mm256_set1_ps(kHi));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

// Columns [c0, c1) of one row: x <- (x + b) * it in place; returns the max.
inline float scale_max(float* row, const float* b, float it, int64_t c0, int64_t c1) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t c = c0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 vm = _mm256_set1_ps(m), vit = _mm256_set1_ps(it);
  for (; c + kLanes <= c1; c += kLanes) {
    __m256 x = _mm256_loadu_ps(row + c);
    if (b != nullptr) x = _mm256_add_ps(x, _mm256_loadu_ps(b + c));
    x = _mm256_mul_ps(x, vit);
    _mm256_storeu_ps(row + c, x);
    vm = _mm256_max_ps(vm, x);
  }
  m = hmax8(vm);
#endif
  for (; c < c1; ++c) {
    const float x = (row[c] + (b != nullptr ? b[c] : 0.0f)) * it;
    row[c] = x;
    m = x > m ? x : m;
  }
  return m;
}

// sum exp(x - m) over columns [c0, c1)  (and, when ent, sum exp(x - m) (x - m) into *t)
inline float sum_exp(const float* row, float m, int64_t c0, int64_t c1, float* t) {
  float s = 0.0f, u = 0.0f;
  int64_t c = c0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 vs = _mm256_setzero_ps(), vu = _mm256_setzero_ps(), vm = _mm256_set1_ps(m);
  for (; c + kLanes <= c1; c += kLanes) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(row + c), vm);
    const __m256 p = exp8(d);
    vs = _mm256_add_ps(vs, p);
    if (t != nullptr) vu = _mm256_fmadd_ps(p, d, vu);
  }
  s = hsum8(vs);
  u = hsum8(vu);
#endif
  for (; c < c1; ++c) {
    const float d = row[c] - m, p = fast_exp(d);
    s += p;
    u += p * d;
  }
  if (t != nullptr) *t = u;
  return s;
}

// x <- (-(c + er d) p + [v = y] g) * it with d = (x + b) * sc - l, p = exp(d), over a whole row
inline void grad_row(float* row, const float* b, float sc, float l, float c, float er, float it, int64_t v) {
  int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vsc = _mm256_set1_ps(sc), vl = _mm256_set1_ps(l), vc = _mm256_set1_ps(c), ve = _mm256_set1_ps(er),
               vit = _mm256_set1_ps(-it);
  for (; k + kLanes <= v; k += kLanes) {
    __m256 x = _mm256_loadu_ps(row + k);
    if (b != nullptr) x = _mm256_add_ps(x, _mm256_loadu_ps(b + k));
    const __m256 d = _mm256_fmsub_ps(x, vsc, vl);
    const __m256 p = exp8(d);
    _mm256_storeu_ps(row + k, _mm256_mul_ps(_mm256_mul_ps(p, _mm256_fmadd_ps(ve, d, vc)), vit));
  }
#endif
  for (; k < v; ++k) {
    const float d = (row[k] + (b != nullptr ? b[k] : 0.0f)) * sc - l;
    row[k] = -(c + er * d) * fast_exp(d) * it;
  }
}

void check_rows(const at::Tensor& z, const at::Tensor& targets) {
  TORCH_CHECK(z.device().is_cpu() && z.scalar_type() == at::kFloat && z.dim() == 2 && z.is_contiguous(),
              "fasthint_native: z must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == z.size(0) && targets.is_contiguous(),
              "fasthint_native: targets must be int64 [rows]");
}

const float* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t v) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == v,
              "fasthint_native: bias must be contiguous float32 [V]");
  return bias->data_ptr<float>();
}

// In place z <- (z + b) * inv_t; returns (lse, z_y, entropy) per row (entropy 0 unless requested).
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_stats_(at::Tensor z, const c10::optional<at::Tensor>& bias,
                                                              double inv_t, const at::Tensor& targets,
                                                              bool entropy) {
  check_rows(z, targets);
  const int64_t rows = z.size(0), v = z.size(1);
  const float* b = bias_ptr(bias, v);
  const float it = static_cast<float>(inv_t);
  auto opts = z.options();
  at::Tensor lse = at::empty({rows}, opts), zy = at::empty({rows}, opts), ent = at::zeros({rows}, opts);
  float* zp = z.data_ptr<float>();
  const int64_t* yp = targets.data_ptr<int64_t>();
  float *lp = lse.data_ptr<float>(), *zyp = zy.data_ptr<float>(), *ep = ent.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = zp + r * v;
      float m = -std::numeric_limits<float>::infinity();
      double sum = 0.0;  // online over blocks: sum = sum_v exp(z_v - m)
      for (int64_t c0 = 0; c0 < v; c0 += kBlock) {
        const int64_t c1 = c0 + kBlock < v ? c0 + kBlock : v;
        const float bm = scale_max(row, b, it, c0, c1);  // the block stays in L1 for sum_exp
        const double bs = sum_exp(row, bm, c0, c1, nullptr);
        if (bm > m) {
          sum = sum * std::exp(static_cast<double>(m) - bm) + bs;
          m = bm;
        } else {
          sum += bs * std::exp(static_cast<double>(bm) - m);
        }
      }
      const float l = m + static_cast<float>(std::log(sum));
      lp[r] = l;
      const int64_t y = yp[r];
      TORCH_CHECK(y >= 0 && y < v, "fasthint_native: target out of range");
      zyp[r] = row[y];
      if (entropy) {  // H = -sum_v p_v (z_v - l), blocks summed in double
        double h = 0.0;
        for (int64_t c0 = 0; c0 < v; c0 += kBlock) {
          float t = 0.0f;
          sum_exp(row, l, c0, c0 + kBlock < v ? c0 + kBlock : v, &t);
          h -= t;
        }
        ep[r] = static_cast<float>(h);
      }
    }
  });
  return {lse, zy, ent};
}

// In place z -> dL/dz_raw (the gradient w.r.t. H W^T + b, i.e. already divided by T).
// raw: z still holds H W^T (the backward's recomputed chunk): scale and bias first.
void logit_grad_(at::Tensor z, const c10::optional<at::Tensor>& bias, double inv_t, bool raw,
                 const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& g,
                 const c10::optional<at::Tensor>& e, const c10::optional<at::Tensor>& ent) {
  check_rows(z, targets);
  const int64_t rows = z.size(0), v = z.size(1);
  const float* b = raw ? bias_ptr(bias, v) : nullptr;
  const float it = static_cast<float>(inv_t);
  for (const at::Tensor* t : {&lse, &g}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == rows,
                "fasthint_native: lse and g must be float32 [rows]");
  }
  const bool with_e = e.has_value() && e->defined();
  if (with_e) {
    TORCH_CHECK(ent.has_value() && ent->defined() && e->numel() == rows && ent->numel() == rows &&
                    e->scalar_type() == at::kFloat && ent->scalar_type() == at::kFloat,
                "fasthint_native: e and ent must be float32 [rows]");
  }
  float* zp = z.data_ptr<float>();
  const int64_t* yp = targets.data_ptr<int64_t>();
  const float *lp = lse.data_ptr<float>(), *gp = g.data_ptr<float>();
  const at::Tensor ec = with_e ? e->contiguous() : at::Tensor(), hc = with_e ? ent->contiguous() : at::Tensor();
  const float* epp = with_e ? ec.data_ptr<float>() : nullptr;
  const float* hp = with_e ? hc.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = zp + r * v;
      const float l = lp[r], gr = gp[r];
      const float er = with_e ? epp[r] : 0.0f;
      const float c = gr + er * (with_e ? hp[r] : 0.0f);
      grad_row(row, raw ? b : nullptr, raw ? it : 1.0f, l, c, er, it, v);
      row[yp[r]] += gr * it;
    }
  });
}

}  // namespace

TORCH_LIBRARY(fasthint_native, m) {
  m.def("softmax_stats_(Tensor(a!) z, Tensor? bias, float inv_t, Tensor targets, bool entropy) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("logit_grad_(Tensor(a!) z, Tensor? bias, float inv_t, bool raw, Tensor targets, Tensor lse, Tensor g, "
        "Tensor? e, Tensor? ent) -> ()");
}

TORCH_LIBRARY_IMPL(fasthint_native, CPU, m) {
  m.impl("softmax_stats_", &softmax_stats_);
  m.impl("logit_grad_", &logit_grad_);
}
