// Shared pieces of ssamba's CPU kernels (selective scan, causal depthwise conv): 16-lane
// vectors over channels and the few functions they need, strided (batch, rows, length)
// tensor access, and the thread split.
//
// Vectors are GCC/Clang vector extensions: one AVX-512 register holds 16 floats (one lane
// per channel), and the compiler splits the vectors on machines without AVX-512. float is
// the fast path; double (gradcheck, float64 models) calls the exact libm functions lane by
// lane.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SSAMBA_HAS_MXCSR 1
#endif

namespace ssamba {

constexpr int64_t kLanes = 16;  // channels per work item: one AVX-512 register of floats
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// Denormal states (long decays) are ~100x slower on x86; they carry no useful signal.
struct FlushDenormalsInScope {
#ifdef SSAMBA_HAS_MXCSR
  unsigned int saved = _mm_getcsr();
  FlushDenormalsInScope() { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
  ~FlushDenormalsInScope() { _mm_setcsr(saved); }
#endif
};

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
  typedef int32_t Int __attribute__((vector_size(kLanes * sizeof(float))));

  // 2^x = 2^f * 2^k with k = floor(x), f = x - k in [0, 1); 2^f by a polynomial fitted
  // for relative error (1.04e-7, float rounding level), 2^k put into the exponent.
  // Branch-free; on AVX-512 two instructions do the splitting and scaling (vreduceps,
  // vscalefps): 8 instructions per exp instead of 10-12.
  static inline Vec exp2(Vec x) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    const __m512 f = _mm512_reduce_ps((__m512)x, 0x09);  // x - floor(x)
    return (Vec)_mm512_scalef_ps((__m512)poly((Vec)f), (__m512)x);
#else
    x = x < -126.0f ? Vec{} - 126.0f : x;
    x = x > 126.0f ? Vec{} + 126.0f : x;
    // floor by adding and removing 1.5 * 2^23 (std::floor blocks vectorisation); at an
    // exact integer this may give x - 1 and f = 1, which the polynomial also covers.
    const Vec k = (x - 0.5f + 12582912.0f) - 12582912.0f;
    const Int bits = (__builtin_convertvector(k, Int) + 127) << 23;
    return poly(x - k) * (Vec)bits;
#endif
  }
  static inline Vec poly(Vec f) {
    Vec p = 2.1612923592e-4f + Vec{};
    p = p * f + 1.2467844645e-3f;
    p = p * f + 9.6754515544e-3f;
    p = p * f + 5.5485282093e-2f;
    p = p * f + 2.4022930861e-1f;
    p = p * f + 6.9314706326e-1f;
    return p * f + 1.0f;
  }
  static inline Vec exp(Vec x) { return exp2(x * float(kLog2e)); }
  // 1/x; on AVX-512 a 14-bit estimate refined by one Newton step (~1 ulp): a division
  // costs as much as a whole exp.
  static inline Vec reciprocal(Vec x) {
#ifdef __AVX512F__
    const Vec r = (Vec)_mm512_rcp14_ps((__m512)x);
    return r * (2.0f - x * r);
#else
    return 1.0f / x;
#endif
  }
  // Inputs below -80 are clamped so 1 + exp(-x) stays finite (the result is ~1e-35).
  static inline Vec sigmoid(Vec x) {
    x = x < -80.0f ? Vec{} - 80.0f : x;
    return reciprocal(1.0f + exp(-x));
  }
  // softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|), with log1p(e) for e in (0, 1] as
  // 2 atanh(e / (2 + e)), whose odd series converges fast for arguments <= 1/3 (relative
  // error < 2e-8): no libm call, so it vectorises. Agrees with torch (threshold 20).
  // Its derivative sigmoid(x) = (x > 0 ? 1 : e) / (1 + e) shares e.
  static inline Vec softplus(Vec x, Vec* derivative = nullptr) {
    const Vec ax = x < 0.0f ? -x : x;
    const Vec e = exp(-ax);
    const Vec s = e * reciprocal(2.0f + e), s2 = s * s;
    Vec series = 1.0f / 13.0f + Vec{};
    for (const float c : {11.0f, 9.0f, 7.0f, 5.0f, 3.0f, 1.0f}) series = series * s2 + 1.0f / c;
    if (derivative) *derivative = (x > 0.0f ? Vec{} + 1.0f : e) * reciprocal(1.0f + e);
    return (x > 0.0f ? x : Vec{}) + 2.0f * s * series;
  }
};

template <>
struct Simd<double> {
  typedef double Vec __attribute__((vector_size(kLanes * sizeof(double))));

  template <typename F>
  static inline Vec per_lane(Vec x, const F& f) {
    for (int64_t l = 0; l < kLanes; ++l) x[l] = f(x[l]);
    return x;
  }
  static inline Vec exp2(Vec x) { return per_lane(x, [](double v) { return std::exp2(v); }); }
  static inline Vec exp(Vec x) { return per_lane(x, [](double v) { return std::exp(v); }); }
  static inline Vec sigmoid(Vec x) { return 1.0 / (1.0 + exp(-x)); }
  static inline Vec softplus(Vec x, Vec* derivative = nullptr) {
    if (derivative) *derivative = sigmoid(x);
    return per_lane(x, [](double v) { return v <= 20.0 ? std::log1p(std::exp(v)) : v; });
  }
};

template <typename T>
using Vec = typename Simd<T>::Vec;

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline T lane_sum(const Vec<T>& v) {
  T sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += v[l];
  return sum;
}

// A (batch, rows, length) tensor seen through its strides; rows are channels or states.
template <typename T>
struct Strided {
  T* data = nullptr;
  int64_t sb = 0, sr = 0, st = 0;
  Strided() = default;
  explicit Strided(const at::Tensor& x)
      : data(x.defined() ? x.data_ptr<T>() : nullptr),
        sb(x.defined() ? x.stride(0) : 0),
        sr(x.defined() ? x.stride(1) : 0),
        st(x.defined() ? x.stride(2) : 0) {}
  T& at(int64_t b, int64_t r, int64_t t) const { return data[b * sb + r * sr + t * st]; }
};

// Split `items` into one contiguous range per thread and run fn(task, first, last) on each.
template <typename F>
void for_each_task(int64_t items, int64_t tasks, const F& fn) {
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    FlushDenormalsInScope flush;
    for (int64_t t = t0; t < t1; ++t) fn(t, t * items / tasks, (t + 1) * items / tasks);
  });
}

inline int64_t task_count(int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(items, at::get_num_threads()));
}

// Run fn(item) for items 0..items-1 on up to `task_count(items)` threads, each taking the
// next unclaimed item: a thread slowed by other processes (DataLoader workers, other jobs)
// then does fewer items instead of holding the others up. fn(item) must not depend on
// which thread runs it. `setup()` runs once per thread before its first item and returns
// the thread's scratch state, passed to fn as fn(state, item).
template <typename Setup, typename F>
void for_each_item(int64_t items, const Setup& setup, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t tasks = task_count(items);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    FlushDenormalsInScope flush;
    for (int64_t t = t0; t < t1; ++t) {
      auto state = setup();
      for (int64_t item = next++; item < items; item = next++) fn(state, item);
    }
  });
}

template <typename T>
inline Vec<T> silu(const Vec<T>& z) {
  return z * Simd<T>::sigmoid(z);
}

}  // namespace ssamba
