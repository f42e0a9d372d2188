// Selective scan (the S6 recurrence of Mamba-1) on CPU: forward and hand-written backward.
//
//   delta'_t = softplus(delta_t + delta_bias) or delta_t + delta_bias
//   h_t      = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t
//   y_t      = <C_t, h_t> + D * u_t;       out_t = y_t * silu(z_t)
//
// Layout of the work (each choice measured on a 2-core AVX-512 machine, see
// docs/PERFORMANCE.md of the design notes):
// - one work item = (batch, block of kLanes = 16 channels); items run in parallel, time runs
//   sequentially inside an item; the 16 channels of a state live in one AVX-512 register
//   (vectorising over channels, not over the d_state states, was 4x faster);
// - time is processed in chunks: the inputs of a chunk are first copied into small
//   (step, lane) tiles, which is where arbitrary strides (channels-last views, reversed
//   time) are absorbed, and where softplus runs outside the vectorised loop;
// - the forward keeps only the state at the start of each chunk; the backward recomputes
//   the chunk's states from it, then runs the adjoint recurrence backwards in time;
// - dA, dD and d(delta_bias) are summed over thousands of steps: chunk sums are float,
//   the running total is double.
// Python (ssamba/models/scan.py) validates shapes and dtypes before calling in.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define SSAMBA_HAS_MXCSR 1
#endif

namespace {

constexpr int64_t kLanes = 16;  // channels per work item: one AVX-512 register of floats

// Denormal states (long decays) are ~100x slower on x86; they carry no useful signal.
struct FlushDenormalsInScope {
#ifdef SSAMBA_HAS_MXCSR
  unsigned int saved = _mm_getcsr();
  FlushDenormalsInScope() { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
  ~FlushDenormalsInScope() { _mm_setcsr(saved); }
#endif
};

// Branch-free exp (Cephes polynomial, relative error ~1e-7) so the compiler vectorises the
// state loop; the double version stays exact because gradcheck runs in double.
inline float vec_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // Round to nearest by adding and removing 1.5 * 2^23: std::floor blocks vectorisation.
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}
inline double vec_exp(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + vec_exp(-x));
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), branch-free so the tile loop vectorises
// (glibc's scalar log1pf cost 3x the whole recurrence). log1p(e) for e in (0, 1] is
// 2 atanh(e / (2 + e)), whose odd series converges fast for arguments <= 1/3:
// relative error < 1e-8. Agrees with torch's softplus (threshold 20) to float precision.
inline float softplus(float x) {
  const float e = vec_exp(-std::abs(x));
  const float s = e / (2.0f + e), s2 = s * s;
  float series = 1.0f / 17.0f;
  series = series * s2 + 1.0f / 15.0f;
  series = series * s2 + 1.0f / 13.0f;
  series = series * s2 + 1.0f / 11.0f;
  series = series * s2 + 1.0f / 9.0f;
  series = series * s2 + 1.0f / 7.0f;
  series = series * s2 + 1.0f / 5.0f;
  series = series * s2 + 1.0f / 3.0f;
  series = series * s2 + 1.0f;
  return std::max(x, 0.0f) + 2.0f * s * series;
}
inline double softplus(double x) { return x <= 20.0 ? std::log1p(std::exp(x)) : x; }

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

template <typename T>
struct Problem {
  int64_t batch, dim, length, states, chunk, blocks, chunks;
  bool softplus, reverse;
  Strided<T> u, delta, z, B, C;
  const T* A;     // (dim, states)
  const T* D;     // (dim,) or null
  const T* bias;  // (dim,) or null

  int64_t time_at(int64_t position) const { return reverse ? length - 1 - position : position; }
  int64_t chunk_steps(int64_t c) const { return std::min(chunk, length - c * chunk); }
};

template <typename T>
Problem<T> make_problem(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                        const at::Tensor& z, const at::Tensor& bias, bool softplus, bool reverse,
                        int64_t chunk) {
  Problem<T> p;
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.length = u.size(2);
  p.states = A.size(1);
  p.chunk = chunk;
  p.blocks = (p.dim + kLanes - 1) / kLanes;
  p.chunks = std::max<int64_t>(1, (p.length + chunk - 1) / chunk);
  p.softplus = softplus;
  p.reverse = reverse;
  p.u = Strided<T>(u);
  p.delta = Strided<T>(delta);
  p.z = Strided<T>(z);
  p.B = Strided<T>(B);
  p.C = Strided<T>(C);
  p.A = A.data_ptr<T>();
  p.D = D.defined() ? D.data_ptr<T>() : nullptr;
  p.bias = bias.defined() ? bias.data_ptr<T>() : nullptr;
  return p;
}

// Copy steps [first, first + steps) of `src` for channels [c0, c0 + lanes) into a
// (step, kLanes) tile, zero-padding missing lanes. The loop order follows the smaller
// stride so channels-last and time-contiguous inputs are both read sequentially; reversed
// time is a negative step.
template <typename T, typename Copy>
void for_tile(const Problem<T>& p, const Strided<T>& src, int64_t b, int64_t c0, int64_t lanes,
              int64_t first, int64_t steps, const Copy& copy) {
  if (steps <= 0) return;
  T* origin = &src.at(b, c0, p.time_at(first));
  const int64_t step_stride = p.reverse ? -src.st : src.st;
  if (src.sr == 1) {  // channels-last: each step is one contiguous run of channels
    for (int64_t s = 0; s < steps; ++s) {
      T* row = origin + s * step_stride;
#pragma omp simd
      for (int64_t l = 0; l < lanes; ++l) copy(row[l], s * kLanes + l);
    }
  } else {  // time-contiguous (or anything else): walk each channel along time
    for (int64_t l = 0; l < lanes; ++l) {
      T* column = origin + l * src.sr;
      for (int64_t s = 0; s < steps; ++s) copy(column[s * step_stride], s * kLanes + l);
    }
  }
}

template <typename T>
void load_tile(const Problem<T>& p, const Strided<T>& src, int64_t b, int64_t c0, int64_t lanes,
               int64_t first, int64_t steps, T* tile) {
  std::fill(tile, tile + steps * kLanes, T(0));
  for_tile(p, src, b, c0, lanes, first, steps, [tile](T& x, int64_t i) { tile[i] = x; });
}

template <typename T>
void store_tile(const Problem<T>& p, const Strided<T>& dst, int64_t b, int64_t c0, int64_t lanes,
                int64_t first, int64_t steps, const T* tile) {
  for_tile(p, dst, b, c0, lanes, first, steps, [tile](T& x, int64_t i) { x = tile[i]; });
}

// (step, state) rows of B or C for one batch element and one chunk.
template <typename T>
void load_state_rows(const Problem<T>& p, const Strided<T>& src, int64_t b, int64_t first,
                     int64_t steps, T* rows) {
  if (steps <= 0) return;
  const T* origin = &src.at(b, 0, p.time_at(first));
  const int64_t step_stride = p.reverse ? -src.st : src.st;
  for (int64_t n = 0; n < p.states; ++n)
    for (int64_t s = 0; s < steps; ++s) rows[s * p.states + n] = origin[n * src.sr + s * step_stride];
}

// Per-thread scratch for one work item and one chunk; sized once per task.
template <typename T>
struct Scratch {
  std::vector<T> u, dt, z, raw_dt, out, Brows, Crows, A, D, bias;
  std::vector<T> h, h0, g, h_hist, decay_hist, y;  // backward recomputation
  Scratch(const Problem<T>& p) {
    const int64_t tile = p.chunk * kLanes, st = p.states * kLanes;
    for (auto* v : {&u, &dt, &z, &raw_dt, &out, &y}) v->resize(tile);
    Brows.resize(p.chunk * p.states);
    Crows.resize(p.chunk * p.states);
    A.resize(st);
    for (auto* v : {&D, &bias}) v->resize(kLanes);
    for (auto* v : {&h, &h0, &g}) v->resize(st);
  }
  void reserve_history(const Problem<T>& p) {
    h_hist.resize(p.chunk * p.states * kLanes);
    decay_hist.resize(p.chunk * p.states * kLanes);
  }
};

// Per-block constants: A as (state, lane), D and delta_bias as lanes (zero-padded).
template <typename T>
void load_block_constants(const Problem<T>& p, int64_t c0, int64_t lanes, Scratch<T>& w) {
  std::fill(w.A.begin(), w.A.end(), T(0));
  std::fill(w.D.begin(), w.D.end(), T(0));
  std::fill(w.bias.begin(), w.bias.end(), T(0));
  for (int64_t l = 0; l < lanes; ++l) {
    for (int64_t n = 0; n < p.states; ++n) w.A[n * kLanes + l] = p.A[(c0 + l) * p.states + n];
    if (p.D) w.D[l] = p.D[c0 + l];
    if (p.bias) w.bias[l] = p.bias[c0 + l];
  }
}

// Tiles of u, z and delta' for one chunk; raw_dt keeps delta + bias for softplus' gradient.
template <typename T>
void load_chunk_inputs(const Problem<T>& p, int64_t b, int64_t c0, int64_t lanes, int64_t first,
                       int64_t steps, Scratch<T>& w) {
  load_tile(p, p.u, b, c0, lanes, first, steps, w.u.data());
  load_tile(p, p.delta, b, c0, lanes, first, steps, w.raw_dt.data());
  if (p.z.data) load_tile(p, p.z, b, c0, lanes, first, steps, w.z.data());
  for (int64_t s = 0; s < steps; ++s) {
    T* raw = &w.raw_dt[s * kLanes];
    T* dt = &w.dt[s * kLanes];
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) raw[l] += w.bias[l];
    if (p.softplus) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) dt[l] = softplus(raw[l]);
    } else {
      std::copy(raw, raw + kLanes, dt);
    }
    // Padding lanes get delta' = 0: decay 1, no input, their state stays zero.
    std::fill(dt + lanes, dt + kLanes, T(0));
  }
  load_state_rows(p, p.B, b, first, steps, w.Brows.data());
  load_state_rows(p, p.C, b, first, steps, w.Crows.data());
}

// One recurrence step for kLanes channels: h <- exp(dt*A) * h + dt*u*B; returns <C, h> in y.
// kStates > 0 fixes the state count at compile time (full unrolling); 0 reads it at run time.
template <typename T, int kStates, bool kKeepDecay>
inline void step(const Problem<T>& p, const T* A, const T* dt, const T* u, const T* Brow,
                 const T* Crow, T* h, T* y, T* decay_out) {
  const int64_t states = kStates > 0 ? kStates : p.states;
  alignas(64) T dtu[kLanes];
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) {
    dtu[l] = dt[l] * u[l];
    y[l] = T(0);
  }
  for (int64_t n = 0; n < states; ++n) {
    const T bn = Brow[n], cn = Crow[n];
    T* hn = h + n * kLanes;
    const T* An = A + n * kLanes;
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const T decay = vec_exp(dt[l] * An[l]);
      hn[l] = decay * hn[l] + dtu[l] * bn;
      y[l] += hn[l] * cn;
      if constexpr (kKeepDecay) decay_out[n * kLanes + l] = decay;
    }
  }
}

// y <- (y + D*u) * silu(z), over a chunk tile.
template <typename T>
void skip_and_gate(const Problem<T>& p, int64_t steps, const Scratch<T>& w, const T* y, T* out) {
  for (int64_t s = 0; s < steps; ++s) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t i = s * kLanes + l;
      T v = y[i] + w.D[l] * w.u[i];
      if (p.z.data) v *= w.z[i] * sigmoid(w.z[i]);
      out[i] = v;
    }
  }
}

// Split `items` into one contiguous range per thread and run fn(task, first, last) on each;
// the task index lets the backward keep per-task partial sums and merge them in a fixed order.
template <typename F>
void for_each_task(int64_t items, int64_t tasks, const F& fn) {
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    FlushDenormalsInScope flush;
    for (int64_t t = t0; t < t1; ++t) fn(t, t * items / tasks, (t + 1) * items / tasks);
  });
}

int64_t task_count(int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(items, at::get_num_threads()));
}

template <typename T, int kStates>
void forward_kernel(const Problem<T>& p, const Strided<T>& out, T* last_state, T* chunk_states) {
  const int64_t items = p.batch * p.blocks;
  for_each_task(items, task_count(items), [&](int64_t, int64_t first_item, int64_t last_item) {
    Scratch<T> w(p);
    for (int64_t item = first_item; item < last_item; ++item) {
      const int64_t b = item / p.blocks, c0 = (item % p.blocks) * kLanes;
      const int64_t lanes = std::min(kLanes, p.dim - c0);
      load_block_constants(p, c0, lanes, w);
      std::fill(w.h.begin(), w.h.end(), T(0));
      for (int64_t c = 0; c < p.chunks; ++c) {
        // chunk_states: (batch, chunks, states, dim), the state entering chunk c.
        T* saved = chunk_states + ((b * p.chunks + c) * p.states) * p.dim + c0;
        for (int64_t n = 0; n < p.states; ++n)
          for (int64_t l = 0; l < lanes; ++l) saved[n * p.dim + l] = w.h[n * kLanes + l];
        const int64_t first = c * p.chunk, steps = std::max<int64_t>(0, p.chunk_steps(c));
        load_chunk_inputs(p, b, c0, lanes, first, steps, w);
        for (int64_t s = 0; s < steps; ++s)
          step<T, kStates, false>(p, w.A.data(), &w.dt[s * kLanes], &w.u[s * kLanes],
                                  &w.Brows[s * p.states], &w.Crows[s * p.states], w.h.data(),
                                  &w.y[s * kLanes], nullptr);
        skip_and_gate(p, steps, w, w.y.data(), w.out.data());
        store_tile(p, out, b, c0, lanes, first, steps, w.out.data());
      }
      for (int64_t l = 0; l < lanes; ++l)
        for (int64_t n = 0; n < p.states; ++n)
          last_state[(b * p.dim + c0 + l) * p.states + n] = w.h[n * kLanes + l];
    }
  });
}

template <typename T>
struct Gradients {
  Strided<T> du, ddelta, dz, dout;
  const T* dlast = nullptr;  // (batch, dim, states) or null
  double* dA = nullptr;      // (batch, dim, states) partial sums, reduced over batch later
  double* dD = nullptr;      // (batch, dim)
  double* dbias = nullptr;   // (batch, dim)
};

template <typename T, int kStates>
void backward_kernel(const Problem<T>& p, const Gradients<T>& grad, const T* chunk_states,
                     T* dB, T* dC) {
  const int64_t items = p.batch * p.blocks, tasks = task_count(items);
  const int64_t row = p.length * p.states;  // dB/dC: (batch, length, states)
  // Channel blocks of one batch element all add into the same dB/dC rows: each task sums
  // into its own buffer, merged below in task order (deterministic results).
  std::vector<std::vector<T>> partial_dB(tasks), partial_dC(tasks);
  std::vector<int64_t> first_batch(tasks);
  for_each_task(items, tasks, [&](int64_t task, int64_t first_item, int64_t last_item) {
    if (first_item >= last_item) return;
    const int64_t b_first = first_item / p.blocks, b_last = (last_item - 1) / p.blocks;
    first_batch[task] = b_first;
    auto& pdB = partial_dB[task];
    auto& pdC = partial_dC[task];
    pdB.assign((b_last - b_first + 1) * row, T(0));
    pdC.assign((b_last - b_first + 1) * row, T(0));
    Scratch<T> w(p);
    w.reserve_history(p);
    const int64_t st = p.states * kLanes;
    std::vector<T> dout(p.chunk * kLanes), du(p.chunk * kLanes), dtile(p.chunk * kLanes),
        dz(p.chunk * kLanes), dA_chunk(st), dy(kLanes);
    std::vector<double> dA_total(st), dD_total(kLanes), dbias_total(kLanes);
    for (int64_t item = first_item; item < last_item; ++item) {
      const int64_t b = item / p.blocks, c0 = (item % p.blocks) * kLanes;
      const int64_t lanes = std::min(kLanes, p.dim - c0);
      T* rowB = pdB.data() + (b - b_first) * row;
      T* rowC = pdC.data() + (b - b_first) * row;
      load_block_constants(p, c0, lanes, w);
      std::fill(w.g.begin(), w.g.end(), T(0));
      if (grad.dlast)
        for (int64_t l = 0; l < lanes; ++l)
          for (int64_t n = 0; n < p.states; ++n)
            w.g[n * kLanes + l] = grad.dlast[(b * p.dim + c0 + l) * p.states + n];
      std::fill(dA_total.begin(), dA_total.end(), 0.0);
      std::fill(dD_total.begin(), dD_total.end(), 0.0);
      std::fill(dbias_total.begin(), dbias_total.end(), 0.0);
      for (int64_t c = p.chunks - 1; c >= 0; --c) {
        const int64_t first = c * p.chunk, steps = std::max<int64_t>(0, p.chunk_steps(c));
        load_chunk_inputs(p, b, c0, lanes, first, steps, w);
        load_tile(p, grad.dout, b, c0, lanes, first, steps, dout.data());
        // Recompute the chunk's states from the saved one, keeping h_s and exp(dt_s*A).
        const T* saved = chunk_states + ((b * p.chunks + c) * p.states) * p.dim + c0;
        std::fill(w.h0.begin(), w.h0.end(), T(0));
        for (int64_t n = 0; n < p.states; ++n)
          for (int64_t l = 0; l < lanes; ++l) w.h0[n * kLanes + l] = saved[n * p.dim + l];
        std::copy(w.h0.begin(), w.h0.end(), w.h.begin());
        for (int64_t s = 0; s < steps; ++s) {
          step<T, kStates, true>(p, w.A.data(), &w.dt[s * kLanes], &w.u[s * kLanes],
                           &w.Brows[s * p.states], &w.Crows[s * p.states], w.h.data(),
                           &w.y[s * kLanes], &w.decay_hist[s * st]);
          std::copy(w.h.begin(), w.h.end(), w.h_hist.begin() + s * st);
        }
        std::fill(dA_chunk.begin(), dA_chunk.end(), T(0));
        T dD_chunk[kLanes] = {}, dbias_chunk[kLanes] = {};
        for (int64_t s = steps - 1; s >= 0; --s) {
          const T* u = &w.u[s * kLanes];
          const T* dt = &w.dt[s * kLanes];
          // Through the gate and the skip connection: dy = d(out)/dy * dout.
          for (int64_t l = 0; l < kLanes; ++l) {
            const int64_t i = s * kLanes + l;
            T dyl = dout[i];
            if (p.z.data) {
              const T zs = w.z[i], sg = sigmoid(zs);
              const T y = w.y[i] + w.D[l] * u[l];
              dz[i] = dout[i] * y * sg * (T(1) + zs * (T(1) - sg));
              dyl = dout[i] * zs * sg;
            }
            dy[l] = dyl;
            dD_chunk[l] += dyl * u[l];
          }
          const T* h_prev = s > 0 ? &w.h_hist[(s - 1) * st] : w.h0.data();
          const T* h_now = &w.h_hist[s * st];
          const T* decay = &w.decay_hist[s * st];
          const T* Brow = &w.Brows[s * p.states];
          const T* Crow = &w.Crows[s * p.states];
          const int64_t t = p.time_at(first + s);
          alignas(64) T d_dt[kLanes] = {}, g_dot_B[kLanes] = {};
          alignas(64) T dtu[kLanes];
          for (int64_t l = 0; l < kLanes; ++l) dtu[l] = dt[l] * u[l];
          const int64_t states = kStates > 0 ? kStates : p.states;
          for (int64_t n = 0; n < states; ++n) {
            const T bn = Brow[n], cn = Crow[n];
            T* gn = &w.g[n * kLanes];
            T* dAn = &dA_chunk[n * kLanes];
            const T* An = &w.A[n * kLanes];
            const int64_t o = n * kLanes;
            T sum_dB = 0, sum_dC = 0;
#pragma omp simd reduction(+ : sum_dB, sum_dC)
            for (int64_t l = 0; l < kLanes; ++l) {
              // gn holds dL/dh_s from later steps; add the output's direct contribution.
              const T gs = gn[l] + dy[l] * cn;
              const T x = gs * h_prev[o + l] * decay[o + l];
              d_dt[l] += x * An[l];
              dAn[l] += x * dt[l];
              g_dot_B[l] += gs * bn;
              sum_dB += gs * dtu[l];
              sum_dC += dy[l] * h_now[o + l];
              gn[l] = gs * decay[o + l];  // dL/dh_{s-1} through this step's decay
            }
            rowB[t * p.states + n] += sum_dB;
            rowC[t * p.states + n] += sum_dC;
          }
          for (int64_t l = 0; l < kLanes; ++l) {
            const int64_t i = s * kLanes + l;
            du[i] = dy[l] * w.D[l] + g_dot_B[l] * dt[l];
            T d_raw = d_dt[l] + g_dot_B[l] * u[l];
            if (p.softplus) d_raw *= sigmoid(w.raw_dt[i]);
            dtile[i] = d_raw;
            dbias_chunk[l] += l < lanes ? d_raw : T(0);
          }
        }
        for (int64_t i = 0; i < st; ++i) dA_total[i] += dA_chunk[i];
        for (int64_t l = 0; l < kLanes; ++l) {
          dD_total[l] += dD_chunk[l];
          dbias_total[l] += dbias_chunk[l];
        }
        store_tile(p, grad.du, b, c0, lanes, first, steps, du.data());
        store_tile(p, grad.ddelta, b, c0, lanes, first, steps, dtile.data());
        if (p.z.data) store_tile(p, grad.dz, b, c0, lanes, first, steps, dz.data());
      }
      for (int64_t l = 0; l < lanes; ++l) {
        const int64_t d = b * p.dim + c0 + l;
        for (int64_t n = 0; n < p.states; ++n) grad.dA[d * p.states + n] = dA_total[n * kLanes + l];
        grad.dD[d] = dD_total[l];
        grad.dbias[d] = dbias_total[l];
      }
    }
  });
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t count = static_cast<int64_t>(partial_dB[task].size());
    T* outB = dB + first_batch[task] * row;
    T* outC = dC + first_batch[task] * row;
    for (int64_t i = 0; i < count; ++i) {
      outB[i] += partial_dB[task][i];
      outC[i] += partial_dC[task][i];
    }
  }
}

void check_inputs(const at::Tensor& u, std::initializer_list<at::Tensor> others) {
  TORCH_CHECK(u.device().is_cpu(), "selective_scan: expected CPU tensors, got ", u.device());
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "selective_scan: expected float32 or float64, got ", u.scalar_type());
  for (const auto& x : others)
    if (x.defined())
      TORCH_CHECK(x.scalar_type() == u.scalar_type() && x.device().is_cpu(),
                  "selective_scan: all inputs must share u's dtype and device");
}

at::Tensor or_undefined(const c10::optional<at::Tensor>& x) { return x.has_value() ? *x : at::Tensor(); }

// Instantiate the fixed-state-count fast path for the usual d_state = 16.
template <typename T, typename F16, typename FAny>
void with_states(int64_t states, const F16& f16, const FAny& fany) {
  if (states == 16) f16(); else fany();
}

std::vector<at::Tensor> scan_forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                     const at::Tensor& B, const at::Tensor& C,
                                     const c10::optional<at::Tensor>& D_opt,
                                     const c10::optional<at::Tensor>& z_opt,
                                     const c10::optional<at::Tensor>& bias_opt, bool softplus,
                                     bool reverse, int64_t chunk) {
  const at::Tensor D = or_undefined(D_opt), z = or_undefined(z_opt), bias = or_undefined(bias_opt);
  check_inputs(u, {delta, A, B, C, D, z, bias});
  TORCH_CHECK(A.is_contiguous() && (!D.defined() || D.is_contiguous()) &&
                  (!bias.defined() || bias.is_contiguous()),
              "selective_scan: A, D and delta_bias must be contiguous");
  at::Tensor out = at::empty_like(u);
  at::Tensor last_state = at::empty({u.size(0), u.size(1), A.size(1)}, u.options());
  const int64_t chunks = std::max<int64_t>(1, (u.size(2) + chunk - 1) / chunk);
  at::Tensor chunk_states = at::empty({u.size(0), chunks, A.size(1), u.size(1)}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_forward", [&] {
    const auto p = make_problem<scalar_t>(u, delta, A, B, C, D, z, bias, softplus, reverse, chunk);
    const Strided<scalar_t> out_view(out);
    with_states<scalar_t>(
        p.states,
        [&] { forward_kernel<scalar_t, 16>(p, out_view, last_state.data_ptr<scalar_t>(), chunk_states.data_ptr<scalar_t>()); },
        [&] { forward_kernel<scalar_t, 0>(p, out_view, last_state.data_ptr<scalar_t>(), chunk_states.data_ptr<scalar_t>()); });
  });
  return {out, last_state, chunk_states};
}

std::vector<at::Tensor> scan_backward(const at::Tensor& dout, const c10::optional<at::Tensor>& dlast_opt,
                                      const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C,
                                      const c10::optional<at::Tensor>& D_opt,
                                      const c10::optional<at::Tensor>& z_opt,
                                      const c10::optional<at::Tensor>& bias_opt,
                                      const at::Tensor& chunk_states, bool softplus, bool reverse,
                                      int64_t chunk) {
  const at::Tensor D = or_undefined(D_opt), z = or_undefined(z_opt), bias = or_undefined(bias_opt);
  at::Tensor dlast = or_undefined(dlast_opt);
  check_inputs(u, {dout, delta, A, B, C, D, z, bias, chunk_states});
  if (dlast.defined()) dlast = dlast.to(u.scalar_type()).contiguous();
  const int64_t batch = u.size(0), dim = u.size(1), length = u.size(2), states = A.size(1);
  at::Tensor du = at::empty_like(u), ddelta = at::empty_like(delta);
  at::Tensor dz = z.defined() ? at::empty_like(z) : at::Tensor();
  // dB/dC are summed over channels in (length, states) rows; returned as (batch, states, length) views.
  at::Tensor dB = at::zeros({batch, length, states}, u.options());
  at::Tensor dC = at::zeros({batch, length, states}, u.options());
  const auto f64 = u.options().dtype(at::kDouble);
  at::Tensor dA = at::empty({batch, dim, states}, f64);
  at::Tensor dD = at::empty({batch, dim}, f64), dbias = at::empty({batch, dim}, f64);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_backward", [&] {
    const auto p = make_problem<scalar_t>(u, delta, A, B, C, D, z, bias, softplus, reverse, chunk);
    Gradients<scalar_t> g;
    g.du = Strided<scalar_t>(du);
    g.ddelta = Strided<scalar_t>(ddelta);
    g.dz = Strided<scalar_t>(dz);
    g.dout = Strided<scalar_t>(dout);
    g.dlast = dlast.defined() ? dlast.data_ptr<scalar_t>() : nullptr;
    g.dA = dA.data_ptr<double>();
    g.dD = dD.data_ptr<double>();
    g.dbias = dbias.data_ptr<double>();
    const scalar_t* saved = chunk_states.data_ptr<scalar_t>();
    scalar_t* pB = dB.data_ptr<scalar_t>();
    scalar_t* pC = dC.data_ptr<scalar_t>();
    with_states<scalar_t>(
        p.states, [&] { backward_kernel<scalar_t, 16>(p, g, saved, pB, pC); },
        [&] { backward_kernel<scalar_t, 0>(p, g, saved, pB, pC); });
  });
  const auto dtype = u.scalar_type();
  return {du,
          ddelta,
          dA.sum(0).to(dtype),
          dB.transpose(1, 2),
          dC.transpose(1, 2),
          D.defined() ? dD.sum(0).to(dtype) : at::Tensor(),
          dz,
          bias.defined() ? dbias.sum(0).to(dtype) : at::Tensor()};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ssamba selective scan: CPU forward and backward";
  m.def("forward", &scan_forward, "out, last_state, chunk_states");
  m.def("backward", &scan_backward, "du, ddelta, dA, dB, dC, dD, dz, ddelta_bias");
}
