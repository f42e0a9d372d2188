// Selective scan (the S6 recurrence of Mamba-1) on CPU: forward and hand-written backward.
//
//   delta'_t = softplus(delta_t + delta_bias) or delta_t + delta_bias
//   h_t      = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t
//   y_t      = <C_t, h_t> + D * u_t;       out_t = y_t * silu(z_t)
//
// How the work is laid out (each choice measured on a 2-core AVX-512 machine, see
// PERFORMANCE.md of the design notes and `python -m ssamba.bench scan`):
// - arithmetic is written on 16-lane vectors (GCC/Clang vector extensions), one lane per
//   channel: one AVX-512 register holds one state of 16 channels (the compiler splits the
//   vectors on narrower machines). Over channels, not over the d_state states, the forward
//   needs no horizontal sums; the d_state = 16 loop is unrolled with the states in registers;
// - a work item is one batch element (or, when there are fewer batch elements than threads,
//   a group of its channels); items run in parallel, time runs sequentially inside an item;
// - time is processed in chunks. A chunk's inputs are first copied into (block, step) tiles,
//   reading whole rows of the channels-last (B, L, D) tensors the mixer produces; arbitrary
//   strides and reversed time are absorbed there, and softplus and silu run there, outside
//   the recurrence. While a chunk is computed, the next one is prefetched;
// - exp(dt * A) = exp2(dt * A log2 e), a branch-free polynomial (AVX-512: vreduceps and
//   vscalefps split and scale), 8 instructions;
// - the forward keeps only the state entering each chunk; the backward recomputes a chunk's
//   states and decays from it, then runs the adjoint recurrence backwards in time;
// - dB and dC are sums over channels: per step, the 16 per-state vectors are summed across
//   lanes by one shuffle-and-add tree built while they are produced;
// - dA, dD and d(delta_bias) are summed over thousands of steps: chunk sums are float, the
//   running totals double. Results do not depend on thread timing.
// Python (ssamba/models/scan.py) validates shapes and dtypes before calling in.

#include <numeric>
#include <vector>

#include "simd.h"

namespace ssamba {
namespace {

// Sixteen horizontal sums at once, fed one vector at a time: lane n of the result is the
// sum of the lanes of the n-th vector. The vectors are combined pairwise as they arrive
// (each level adds two half-width shuffles of a pair, halving the count), so at most four
// partial results are live: the state loop keeps its registers. 46 shuffles/adds replace
// 16 horizontal sums of ~8 instructions each. `n` must be a compile-time constant after
// unrolling, fed in order 0..15.
template <typename V>
class LaneSums {
 public:
  inline void add(int64_t n, const V& v) {
    if (!(n & 1)) {
      level0_ = v;
      return;
    }
    const V a = __builtin_shufflevector(level0_, v, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20,
                                        21, 22, 23) +
                __builtin_shufflevector(level0_, v, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27,
                                        28, 29, 30, 31);
    if (!(n & 2)) {
      level1_ = a;
      return;
    }
    const V b = __builtin_shufflevector(level1_, a, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24,
                                        25, 26, 27) +
                __builtin_shufflevector(level1_, a, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15,
                                        28, 29, 30, 31);
    if (!(n & 4)) {
      level2_ = b;
      return;
    }
    const V c = __builtin_shufflevector(level2_, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12,
                                        13, 28, 29) +
                __builtin_shufflevector(level2_, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27,
                                        14, 15, 30, 31);
    if (!(n & 8)) {
      level3_ = c;
      return;
    }
    const V d = __builtin_shufflevector(level3_, c, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26,
                                        12, 28, 14, 30) +
                __builtin_shufflevector(level3_, c, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27,
                                        13, 29, 15, 31);
    // The tree leaves the sums in bit-reversed order.
    sums_ = __builtin_shufflevector(d, d, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
  }
  const V& sums() const { return sums_; }

 private:
  V level0_, level1_, level2_, level3_, sums_;
};

template <typename T>
struct Problem {
  int64_t batch, dim, length, states, chunk, blocks, chunks;
  int64_t groups;  // channel groups per batch element: work items are (batch, group)
  bool softplus, reverse;
  // out = scale * (y + D u) silu(z): the bidirectional mixer's halving of the two directions'
  // sum, folded into the kernel (the backward then sees dout * scale).
  T scale;
  Strided<T> u, delta, z, B, C;
  // Low-rank delta (the mixer's dt_proj inside the kernel): with dt_weight (dim, rank),
  // `delta` holds dt (batch, rank, length) and delta = dt_weight @ dt.
  const T* dt_weight = nullptr;
  int64_t rank = 0;
  const T* A;     // (dim, states)
  const T* D;     // (dim,) or null
  const T* bias;  // (dim,) or null

  int64_t time_at(int64_t position) const { return reverse ? length - 1 - position : position; }
  int64_t chunk_steps(int64_t c) const {
    return std::max<int64_t>(0, std::min(chunk, length - c * chunk));
  }
  int64_t tile_steps() const { return std::max<int64_t>(1, std::min(chunk, length)); }
  int64_t items() const { return batch * groups; }
  int64_t max_group_blocks() const { return (blocks + groups - 1) / groups; }
};

// Work items are (batch element, group of channel blocks), claimed by threads one at a
// time. Whole batch elements keep each time step's channels in one item, so rows are read
// contiguously (half rows measured up to 1.5x slower in the backward); the channels are
// split only as far as needed to give every thread an equal share (batch 1 or 3, 2 threads).
int64_t channel_groups(int64_t batch, int64_t blocks) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t wanted = threads / std::gcd(std::max<int64_t>(batch, 1), threads);
  return std::max<int64_t>(1, std::min(blocks, wanted));
}

template <typename T>
Problem<T> make_problem(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                        const at::Tensor& z, const at::Tensor& bias, bool softplus, bool reverse,
                        int64_t chunk, double scale, const at::Tensor& dt_weight) {
  Problem<T> p;
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.length = u.size(2);
  p.states = A.size(1);
  p.chunk = chunk;
  p.blocks = (p.dim + kLanes - 1) / kLanes;
  p.chunks = std::max<int64_t>(1, (p.length + chunk - 1) / chunk);
  p.groups = channel_groups(p.batch, p.blocks);
  p.softplus = softplus;
  p.reverse = reverse;
  p.scale = static_cast<T>(scale);
  p.u = Strided<T>(u);
  p.delta = Strided<T>(delta);
  p.z = Strided<T>(z);
  p.B = Strided<T>(B);
  p.C = Strided<T>(C);
  if (dt_weight.defined()) {
    p.dt_weight = dt_weight.data_ptr<T>();
    p.rank = dt_weight.size(1);
  }
  p.A = A.data_ptr<T>();
  p.D = D.defined() ? D.data_ptr<T>() : nullptr;
  p.bias = bias.defined() ? bias.data_ptr<T>() : nullptr;
  return p;
}

// One work item: batch element b, channels [c0, c1) = blocks of kLanes channels (the last
// one possibly partial).
struct Item {
  int64_t b, first_block, blocks, c0, c1;
  Item(int64_t index, int64_t groups, int64_t all_blocks, int64_t dim) : b(index / groups) {
    const int64_t group = index % groups;
    first_block = group * all_blocks / groups;
    blocks = (group + 1) * all_blocks / groups - first_block;
    c0 = first_block * kLanes;
    c1 = std::min(dim, c0 + blocks * kLanes);
  }
  int64_t lanes(int64_t j) const { return std::min(kLanes, c1 - c0 - j * kLanes); }
};

// Steps [first, first + steps) of a chunk.
struct Span {
  int64_t first, steps;
};

// Copy the item's channels over a span into (block, step) vectors, tile[j * stride + i],
// zero-padding the missing lanes of a partial block. Channels-last sources (the mixer's
// (B, L, D) projections seen as (B, D, L)) are read row by row, each a contiguous run of
// channels; anything else (time-contiguous, broadcast gradients) channel by channel.
// Reversed time is a negative step stride.
template <typename T>
void load_tiles(const Problem<T>& p, const Strided<T>& src, const Item& it, const Span& s,
                int64_t stride, Vec<T>* tile) {
  if (s.steps <= 0) return;
  const T* origin = &src.at(it.b, it.c0, p.time_at(s.first));
  const int64_t step = p.reverse ? -src.st : src.st, full = (it.c1 - it.c0) / kLanes;
  if (full < it.blocks)
    for (int64_t i = 0; i < s.steps; ++i) tile[full * stride + i] = Vec<T>{};
  if (src.sr == 1) {
    for (int64_t i = 0; i < s.steps; ++i) {
      const T* row = origin + i * step;
      for (int64_t j = 0; j < full; ++j) tile[j * stride + i] = load(row + j * kLanes);
      for (int64_t c = full * kLanes; c < it.c1 - it.c0; ++c)
        tile[full * stride + i][c - full * kLanes] = row[c];
    }
    return;
  }
  for (int64_t c = 0; c < it.c1 - it.c0; ++c) {
    const T* column = origin + c * src.sr;
    Vec<T>* t = tile + (c / kLanes) * stride;
    for (int64_t i = 0; i < s.steps; ++i) t[i][c % kLanes] = column[i * step];
  }
}

// The inverse of load_tiles; with `accumulate` the tile is added to what dst holds (the
// second direction of a bidirectional mixer adds its share to the first one's).
template <typename T>
void store_tiles(const Problem<T>& p, const Strided<T>& dst, const Item& it, const Span& s,
                 int64_t stride, const Vec<T>* tile, bool accumulate = false) {
  if (s.steps <= 0) return;
  T* origin = &dst.at(it.b, it.c0, p.time_at(s.first));
  const int64_t step = p.reverse ? -dst.st : dst.st, full = (it.c1 - it.c0) / kLanes;
  if (dst.sr == 1) {
    for (int64_t i = 0; i < s.steps; ++i) {
      T* row = origin + i * step;
      for (int64_t j = 0; j < full; ++j) {
        T* r = row + j * kLanes;
        store(r, accumulate ? load(r) + tile[j * stride + i] : tile[j * stride + i]);
      }
      for (int64_t c = full * kLanes; c < it.c1 - it.c0; ++c) {
        const T v = tile[full * stride + i][c - full * kLanes];
        row[c] = accumulate ? row[c] + v : v;
      }
    }
    return;
  }
  for (int64_t c = 0; c < it.c1 - it.c0; ++c) {
    T* column = origin + c * dst.sr;
    const Vec<T>* t = tile + (c / kLanes) * stride;
    for (int64_t i = 0; i < s.steps; ++i) {
      const T v = t[i][c % kLanes];
      column[i * step] = accumulate ? column[i * step] + v : v;
    }
  }
}

// Software prefetch of the rows the next chunk will read (and the current chunk will
// write), a few cache lines per step of the recurrence, so streaming the (B, L, D) tensors
// from memory overlaps with the arithmetic instead of following it. Only channels-last
// tensors (each row one contiguous run) are prefetched.
class Prefetcher {
 public:
  template <typename T>
  void add(const Problem<T>& p, const Strided<T>& t, const Item& it, const Span& s, bool write) {
    if (t.data == nullptr || t.sr != 1 || s.steps <= 0 || count_ == kMaxStreams) return;
    const int64_t bytes = (it.c1 - it.c0) * static_cast<int64_t>(sizeof(T));
    streams_[count_++] = {reinterpret_cast<const char*>(&t.at(it.b, it.c0, p.time_at(s.first))),
                          (p.reverse ? -t.st : t.st) * static_cast<int64_t>(sizeof(T)), s.steps,
                          (bytes + kLine - 1) / kLine + 1, write};
    lines_ += s.steps * streams_[count_ - 1].lines;
  }
  // Lines to issue per call so everything is requested within `calls` calls.
  void pace(int64_t calls) { per_call_ = (lines_ + calls - 1) / std::max<int64_t>(1, calls); }
  void issue() {
    for (int64_t k = 0; k < per_call_ && stream_ < count_; ++k) {
      const Stream& s = streams_[stream_];
      const char* line = s.first + row_ * s.row_stride + line_ * kLine;
      if (s.write)
        __builtin_prefetch(line, 1, 2);
      else
        __builtin_prefetch(line, 0, 2);
      if (++line_ == s.lines) {
        line_ = 0;
        if (++row_ == s.rows) row_ = 0, ++stream_;
      }
    }
  }

 private:
  static constexpr int64_t kLine = 64, kMaxStreams = 8;
  struct Stream {
    const char* first;
    int64_t row_stride, rows, lines;
    bool write;
  };
  Stream streams_[kMaxStreams];
  int64_t count_ = 0, lines_ = 0, per_call_ = 0, stream_ = 0, row_ = 0, line_ = 0;
};

// (step, row) values of B, C or dt (rows: states or rank) for one batch element over a span.
template <typename T>
void load_rows(const Problem<T>& p, const Strided<T>& src, int64_t b, const Span& s,
               int64_t count, T* rows) {
  if (s.steps <= 0) return;
  const T* origin = &src.at(b, 0, p.time_at(s.first));
  const int64_t step = p.reverse ? -src.st : src.st;
  for (int64_t i = 0; i < s.steps; ++i)
    for (int64_t n = 0; n < count; ++n) rows[i * count + n] = origin[n * src.sr + i * step];
}

// (states) vectors <-> one block of a (states, dim) slice: a saved chunk state, the last
// state or its gradient.
template <typename T>
void load_state(const T* src, int64_t states, int64_t dim, int64_t lanes, Vec<T>* h) {
  for (int64_t n = 0; n < states; ++n) {
    if (lanes == kLanes) {
      h[n] = load(src + n * dim);
    } else {
      h[n] = Vec<T>{};
      for (int64_t l = 0; l < lanes; ++l) h[n][l] = src[n * dim + l];
    }
  }
}

template <typename T>
void store_state(const Vec<T>* h, int64_t states, int64_t dim, int64_t lanes, T* dst) {
  for (int64_t n = 0; n < states; ++n) {
    if (lanes == kLanes) {
      store(dst + n * dim, h[n]);
    } else {
      for (int64_t l = 0; l < lanes; ++l) dst[n * dim + l] = h[n][l];
    }
  }
}

// Per-channel constants as (block) vectors, computed once per call for all items:
// A * log2(e) as (block, state), so exp(dt * A) = exp2(dt * A2); D; delta_bias; and a mask
// that is 1 in the real lanes and 0 in the padding of a partial last block.
template <typename T>
struct Constants {
  using V = Vec<T>;
  std::vector<V> A2, D, bias, lane_mask;
  std::vector<V> dt_weight;  // (block, rank): the low-rank delta's weights

  explicit Constants(const Problem<T>& p)
      : A2(p.blocks * p.states),
        D(p.blocks),
        bias(p.blocks),
        lane_mask(p.blocks),
        dt_weight(p.blocks * p.rank) {
    for (int64_t d = 0; d < p.dim; ++d) {
      const int64_t j = d / kLanes, l = d % kLanes;
      for (int64_t r = 0; r < p.rank; ++r)
        dt_weight[j * p.rank + r][l] = p.dt_weight[d * p.rank + r];
      for (int64_t n = 0; n < p.states; ++n)
        A2[j * p.states + n][l] = p.A[d * p.states + n] * T(kLog2e);
      D[j][l] = p.D ? p.D[d] : T(0);
      bias[j][l] = p.bias ? p.bias[d] : T(0);
      lane_mask[j][l] = T(1);
    }
  }
};

// Per-task scratch: tiles of one chunk of an item, (block, step) vectors.
template <typename T>
struct Scratch {
  using V = Vec<T>;
  int64_t stride;                // steps per block in a tile
  std::vector<V> u, dt, z, out;  // out: forward only
  std::vector<T> Brows, Crows;   // (step, state)
  std::vector<T> dtrows;         // (step, rank): the low-rank delta's dt
  std::vector<V> h;              // (block, state): the running state / adjoint
  // Backward only: d delta' / d(delta + bias), sigmoid(z), output and input gradients, and
  // the recomputed output (for a caller that did not keep it, e.g. for out_proj's gradient).
  std::vector<V> dsoftplus, sig, dout, dy, du, ddelta, dz, yout;
  std::vector<V> hist, decay;         // one block's recomputed chunk: (step, state)
  std::vector<V> state, dA_chunk;     // (state), when the state count is a run-time value

  Scratch(const Problem<T>& p, bool backward) : stride(p.tile_steps()) {
    const size_t nb = p.max_group_blocks(), st = p.states, tile = nb * stride;
    for (auto* v : {&u, &dt, &z}) v->resize(tile);
    Brows.resize(stride * st);
    Crows.resize(stride * st);
    dtrows.resize(stride * p.rank);
    h.resize(nb * st);
    if (backward) {
      for (auto* v : {&dsoftplus, &sig, &dout, &dy, &du, &ddelta, &dz, &yout}) v->resize(tile);
      hist.resize((stride + 1) * st);  // hist[0] = the entering state, hist[i + 1] after i
      decay.resize(stride * st);
      state.resize(st);
      dA_chunk.resize(st);
    } else {
      out.resize(tile);
    }
  }

  // Tiles of u, delta' (and, for the backward, softplus' derivative), z, B and C rows.
  void load_chunk(const Problem<T>& p, const Constants<T>& consts, const Item& it, const Span& s,
                  bool backward) {
    load_tiles(p, p.u, it, s, stride, u.data());
    if (p.rank) {
      load_rows(p, p.delta, it.b, s, p.rank, dtrows.data());
    } else {
      load_tiles(p, p.delta, it, s, stride, dt.data());
    }
    if (p.z.data) load_tiles(p, p.z, it, s, stride, z.data());
    for (int64_t j = 0; j < it.blocks; ++j) {
      const V bias = consts.bias[it.first_block + j];
      const V mask = consts.lane_mask[it.first_block + j];
      const V* w = &consts.dt_weight[(it.first_block + j) * p.rank];
      for (int64_t i = 0; i < s.steps; ++i) {
        V& d = dt[j * stride + i];
        if (p.rank) {  // delta = dt_weight @ dt, 16 channels at a time, two FMA chains
          const T* dt_i = &dtrows[i * p.rank];
          V even{}, odd{};
          int64_t r = 0;
          for (; r + 1 < p.rank; r += 2) even += w[r] * dt_i[r], odd += w[r + 1] * dt_i[r + 1];
          if (r < p.rank) even += w[r] * dt_i[r];
          d = even + odd;
        }
        if (p.softplus)
          d = Simd<T>::softplus(d + bias, backward ? &dsoftplus[j * stride + i] : nullptr);
        else
          d += bias;
        d *= mask;  // padding lanes: delta' = 0, decay 1, their state stays 0
      }
    }
    load_rows(p, p.B, it.b, s, p.states, Brows.data());
    load_rows(p, p.C, it.b, s, p.states, Crows.data());
  }
};

// The recurrence of one block over a span: per step h <- exp2(dt*A2) * h + dt*u*B and
// y = <C, h>. The forward and the backward's recomputation share it through two hooks:
// on_state(i, n, h_n, decay_n) after each state update, on_step(i, y) after each step.
// kStates > 0 fixes the state count at compile time: the state loop unrolls and the
// states live in registers.
template <typename T, int kStates, typename OnState, typename OnStep>
inline void recurrence(const Vec<T>* A2, const Vec<T>* dt, const Vec<T>* u, const T* Brows,
                       const T* Crows, int64_t states_at_run_time, int64_t steps, Vec<T>* state,
                       const OnState& on_state, const OnStep& on_step) {
  using V = Vec<T>;
  const int64_t states = kStates > 0 ? kStates : states_at_run_time;
  V local[kStates > 0 ? kStates : 1];
  V* h = kStates > 0 ? local : state;
  if constexpr (kStates > 0)
    for (int64_t n = 0; n < kStates; ++n) h[n] = state[n];
  for (int64_t i = 0; i < steps; ++i) {
    const V dti = dt[i], dtu = dti * u[i];
    const T* Bs = Brows + i * states;
    const T* Cs = Crows + i * states;
    V y[2] = {V{}, V{}};  // two partial sums halve the dependency chain
#pragma GCC unroll 16
    for (int64_t n = 0; n < states; ++n) {
      const V decay = Simd<T>::exp2(dti * A2[n]);
      h[n] = decay * h[n] + dtu * Bs[n];
      y[n & 1] += h[n] * Cs[n];
      on_state(i, n, h[n], decay);
    }
    on_step(i, y[0] + y[1]);
  }
  if constexpr (kStates > 0)
    for (int64_t n = 0; n < kStates; ++n) state[n] = h[n];
}

template <typename T, int kStates>
void forward_kernel(const Problem<T>& p, const Strided<T>& out, bool accumulate, T* last_state,
                    T* chunk_states) {
  using V = Vec<T>;
  const int64_t S = p.states;
  const Constants<T> consts(p);
  const bool gated = p.z.data != nullptr;
  auto item = [&](Scratch<T>& w, int64_t index) {
    const int64_t stride = w.stride;
    const Item it(index, p.groups, p.blocks, p.dim);
    std::fill(w.h.begin(), w.h.end(), V{});
    for (int64_t c = 0; c < p.chunks; ++c) {
      const Span span{c * p.chunk, p.chunk_steps(c)};
      w.load_chunk(p, consts, it, span, false);
      Prefetcher prefetch;
      if (c + 1 < p.chunks) {
        const Span next{(c + 1) * p.chunk, p.chunk_steps(c + 1)};
        for (const auto* t : {&p.u, &p.delta, &p.z})
          if (t != &p.delta || !p.rank) prefetch.add(p, *t, it, next, false);
      }
      prefetch.add(p, out, it, span, true);
      prefetch.pace(it.blocks * span.steps);
      // chunk_states: (batch, chunks, states, dim), the state entering chunk c, or null.
      T* saved = chunk_states ? chunk_states + (it.b * p.chunks + c) * S * p.dim + it.c0 : nullptr;
      for (int64_t j = 0; j < it.blocks; ++j) {
        V* h = &w.h[j * S];
        if (saved) store_state(h, S, p.dim, it.lanes(j), saved + j * kLanes);
        const V* u = &w.u[j * stride];
        const V* z = &w.z[j * stride];
        V* y_out = &w.out[j * stride];
        const V D = consts.D[it.first_block + j];
        recurrence<T, kStates>(
            &consts.A2[(it.first_block + j) * S], &w.dt[j * stride], u, w.Brows.data(),
            w.Crows.data(), S, span.steps, h, [](int64_t, int64_t, const V&, const V&) {},
            [&](int64_t i, const V& y) {
              prefetch.issue();
              const V v = y + D * u[i];
              y_out[i] = (gated ? v * silu<T>(z[i]) : v) * p.scale;
            });
      }
      store_tiles(p, out, it, span, stride, w.out.data(), accumulate);
    }
    // last_state: (batch, states, dim), returned as a (batch, dim, states) view.
    for (int64_t j = 0; j < it.blocks; ++j)
      store_state(&w.h[j * S], S, p.dim, it.lanes(j),
                  last_state + it.b * S * p.dim + it.c0 + j * kLanes);
  };
  for_each_item(p.items(), [&] { return Scratch<T>(p, false); }, item);
}

template <typename T>
struct Gradients {
  Strided<T> du, ddelta, dz, dout;
  Strided<T> y;  // the recomputed output, or no data
  // Add to what the tensor holds instead of overwriting it (caller-provided outputs).
  bool add_du = false, add_ddelta = false, add_dz = false, add_y = false;
  const T* dlast = nullptr;  // (batch, states, dim) or null
  T* dB = nullptr;           // (batch, groups, length, states), zero on entry
  T* dC = nullptr;
  T* ddt = nullptr;          // low-rank delta: (batch, groups, length, rank), zero on entry
  // Sums over each batch element's steps, per (batch, block): only the item owning the block
  // adds to it. (batch, blocks, states, lanes) and (batch, blocks, lanes), zero on entry.
  double* dA = nullptr;
  double* dD = nullptr;
  double* dbias = nullptr;
  double* d_dt_weight = nullptr;  // low-rank delta: (batch, blocks, rank, lanes), zero on entry
};

// Backward of block j of an item over one chunk, in two passes:
// 1. recompute the chunk's states from the saved entering state, keeping every h_i and
//    decay_i (and dL/dz, which needs y_i);
// 2. the adjoint recurrence backwards in time; w.h[j] holds dL/dh at the end of the chunk
//    on entry and at its start on return.
// dB and dC (sums over channels) are added to rowB/rowC: (length, states).
template <typename T, int kStates>
void backward_block(const Problem<T>& p, const Constants<T>& consts, const Gradients<T>& grad,
                    const Item& it, int64_t j, const Span& span, const T* saved, Scratch<T>& w,
                    T* rowB, T* rowC, Prefetcher& prefetch) {
  using V = Vec<T>;
  const int64_t S = kStates > 0 ? kStates : p.states, stride = w.stride, steps = span.steps;
  const bool gated = p.z.data != nullptr;
  const V* A2 = &consts.A2[(it.first_block + j) * S];
  const V* dt = &w.dt[j * stride];
  const V* u = &w.u[j * stride];
  const V* z = &w.z[j * stride];
  const V* sig = &w.sig[j * stride];
  const V* dout = &w.dout[j * stride];
  const V* dy = &w.dy[j * stride];
  const V D = consts.D[it.first_block + j];
  V* hist = w.hist.data();
  V* decay = w.decay.data();

  load_state(saved, S, p.dim, it.lanes(j), hist);
  V h[kStates > 0 ? kStates : 1];
  V* state = kStates > 0 ? h : w.state.data();
  for (int64_t n = 0; n < S; ++n) state[n] = hist[n];
  V* dz = &w.dz[j * stride];
  V* yout = &w.yout[j * stride];
  const bool recompute_out = grad.y.data != nullptr;
  recurrence<T, kStates>(
      A2, dt, u, w.Brows.data(), w.Crows.data(), S, steps, state,
      [&](int64_t i, int64_t n, const V& hn, const V& dn) {
        hist[(i + 1) * S + n] = hn;
        decay[i * S + n] = dn;
      },
      [&](int64_t i, const V& y) {
        prefetch.issue();
        const V v = y + D * u[i];
        if (gated)  // d silu(z)/dz = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
          dz[i] = dout[i] * v * sig[i] * (T(1) + z[i] * (T(1) - sig[i]));
        if (recompute_out) yout[i] = (gated ? v * z[i] * sig[i] : v) * p.scale;
      });

  // Adjoint: g = dL/dh_i from the later steps, walking the chunk backwards.
  V g_fixed[kStates > 0 ? kStates : 1], dA_fixed[kStates > 0 ? kStates : 1];
  V* g = kStates > 0 ? g_fixed : &w.h[j * S];
  V* dA = kStates > 0 ? dA_fixed : w.dA_chunk.data();
  for (int64_t n = 0; n < S; ++n) {
    if constexpr (kStates > 0) g[n] = w.h[j * S + n];
    dA[n] = V{};
  }
  V* du = &w.du[j * stride];
  V* ddelta = &w.ddelta[j * stride];
  const V* dsoftplus = &w.dsoftplus[j * stride];
  V dD{}, dbias{};
  for (int64_t i = steps - 1; i >= 0; --i) {
    const V dti = dt[i], ui = u[i], dyi = dy[i], dtu = dti * ui;
    const T* Bs = &w.Brows[i * S];
    const T* Cs = &w.Crows[i * S];
    const V* h_prev = &hist[i * S];
    const V* h_now = &hist[(i + 1) * S];
    const V* dec = &decay[i * S];
    T* dB_row = rowB + p.time_at(span.first + i) * S;
    T* dC_row = rowC + p.time_at(span.first + i) * S;
    V d_dt[2] = {V{}, V{}}, g_dot_B[2] = {V{}, V{}};
    LaneSums<V> sum_dB, sum_dC;  // dB_i, dC_i: sums over channels
#pragma GCC unroll 16
    for (int64_t n = 0; n < S; ++n) {
      const V gs = g[n] + dyi * Cs[n];  // plus the output's direct contribution
      const V x = gs * h_prev[n] * dec[n];
      d_dt[n & 1] += x * A2[n];
      dA[n] += x * dti;
      g_dot_B[n & 1] += gs * Bs[n];
      if constexpr (kStates == kLanes) {
        sum_dB.add(n, gs * dtu);
        sum_dC.add(n, dyi * h_now[n]);
      } else {
        dB_row[n] += lane_sum<T>(gs * dtu);
        dC_row[n] += lane_sum<T>(dyi * h_now[n]);
      }
      g[n] = gs * dec[n];  // dL/dh_{i-1} through this step's decay
    }
    if constexpr (kStates == kLanes) {
      store(dB_row, load(dB_row) + sum_dB.sums());
      store(dC_row, load(dC_row) + sum_dC.sums());
    }
    const V gB = g_dot_B[0] + g_dot_B[1];
    du[i] = dyi * D + gB * dti;
    V d_raw = (d_dt[0] + d_dt[1]) * T(kLn2) + gB * ui;  // A2 = A log2(e)
    if (p.softplus) d_raw *= dsoftplus[i];
    ddelta[i] = d_raw;
    dbias += d_raw;
    dD += dyi * ui;
  }
  const int64_t block = it.b * p.blocks + it.first_block + j;
  double* dA_total = grad.dA + block * S * kLanes;
  for (int64_t n = 0; n < S; ++n) {
    if constexpr (kStates > 0) w.h[j * S + n] = g[n];
    for (int64_t l = 0; l < kLanes; ++l) dA_total[n * kLanes + l] += dA[n][l];
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    grad.dD[block * kLanes + l] += dD[l];
    grad.dbias[block * kLanes + l] += dbias[l];
  }
}

// The low-rank delta's share of a chunk's backward, from the chunk's d delta tile (before
// the bias): d dt_i = dt_weight^T d delta_i (sums over channels, added to rowDT: (length,
// rank)) and d dt_weight += d delta_i dt_i^T (chunk sums in T, running totals in double).
template <typename T>
void low_rank_backward(const Problem<T>& p, const Constants<T>& consts, const Gradients<T>& grad,
                       const Item& it, const Span& span, const Scratch<T>& w, T* rowDT) {
  using V = Vec<T>;
  constexpr int64_t kMaxRank = 128;  // the rank's accumulators live on the stack (8 KB)
  const int64_t R = p.rank, stride = w.stride;
  const V* weight = &consts.dt_weight[it.first_block * R];
  // One accumulator per rank entry: R independent FMA chains instead of one long one.
  V acc[kMaxRank];
  for (int64_t i = 0; i < span.steps; ++i) {
    std::fill(acc, acc + R, V{});
    for (int64_t j = 0; j < it.blocks; ++j) {
      const V d = w.ddelta[j * stride + i];
      for (int64_t r = 0; r < R; ++r) acc[r] += d * weight[j * R + r];
    }
    T* row = rowDT + p.time_at(span.first + i) * R;
    for (int64_t r = 0; r < R; ++r) row[r] += lane_sum<T>(acc[r]);
  }
  for (int64_t j = 0; j < it.blocks; ++j) {
    std::fill(acc, acc + R, V{});
    const V* ddelta = &w.ddelta[j * stride];
    for (int64_t i = 0; i < span.steps; ++i) {
      const T* dt = &w.dtrows[i * R];
      for (int64_t r = 0; r < R; ++r) acc[r] += ddelta[i] * dt[r];
    }
    double* total = grad.d_dt_weight + (it.b * p.blocks + it.first_block + j) * R * kLanes;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t l = 0; l < kLanes; ++l) total[r * kLanes + l] += acc[r][l];
  }
}

template <typename T, int kStates>
void backward_kernel(const Problem<T>& p, const Gradients<T>& grad, const T* chunk_states) {
  using V = Vec<T>;
  const int64_t S = p.states;
  const Constants<T> consts(p);
  const int64_t row = p.length * S;  // one (length, states) slice of dB/dC
  const bool gated = p.z.data != nullptr;
  auto item = [&](Scratch<T>& w, int64_t index) {
    const int64_t stride = w.stride;
    const Item it(index, p.groups, p.blocks, p.dim);
    // Each item owns its own (length, states) slice: no two threads add into one row.
    T* rowB = grad.dB + index * row;
    T* rowC = grad.dC + index * row;
    T* rowDT = p.rank ? grad.ddt + index * p.length * p.rank : nullptr;
    for (int64_t j = 0; j < it.blocks; ++j) {
      V* g = &w.h[j * S];
      if (grad.dlast)
        load_state(grad.dlast + it.b * S * p.dim + it.c0 + j * kLanes, S, p.dim, it.lanes(j), g);
      else
        std::fill(g, g + S, V{});
    }
    for (int64_t c = p.chunks - 1; c >= 0; --c) {
      const Span span{c * p.chunk, p.chunk_steps(c)};
      w.load_chunk(p, consts, it, span, true);
      load_tiles(p, grad.dout, it, span, stride, w.dout.data());
      for (int64_t j = 0; j < it.blocks; ++j)
        for (int64_t i = 0; i < span.steps; ++i) {  // dL/dy, through the gate
          const int64_t k = j * stride + i;
          if (gated) w.sig[k] = Simd<T>::sigmoid(w.z[k]);
          w.dout[k] *= p.scale;  // out = scale * gated output
          w.dy[k] = gated ? w.dout[k] * w.z[k] * w.sig[k] : w.dout[k];
        }
      Prefetcher prefetch;
      if (c > 0) {
        const Span next{(c - 1) * p.chunk, p.chunk_steps(c - 1)};
        for (const auto* t : {&p.u, &p.delta, &p.z, &grad.dout})
          if (t != &p.delta || !p.rank) prefetch.add(p, *t, it, next, false);
      }
      for (const auto* t : {&grad.du, &grad.ddelta, &grad.dz, &grad.y})
        prefetch.add(p, *t, it, span, true);
      prefetch.pace(it.blocks * span.steps);
      const T* saved = chunk_states + (it.b * p.chunks + c) * S * p.dim + it.c0;
      for (int64_t j = 0; j < it.blocks; ++j)
        backward_block<T, kStates>(p, consts, grad, it, j, span, saved + j * kLanes, w, rowB,
                                   rowC, prefetch);
      store_tiles(p, grad.du, it, span, stride, w.du.data(), grad.add_du);
      if (p.rank)
        low_rank_backward(p, consts, grad, it, span, w, rowDT);
      else
        store_tiles(p, grad.ddelta, it, span, stride, w.ddelta.data(), grad.add_ddelta);
      if (gated) store_tiles(p, grad.dz, it, span, stride, w.dz.data(), grad.add_dz);
      if (grad.y.data) store_tiles(p, grad.y, it, span, stride, w.yout.data(), grad.add_y);
    }
  };
  for_each_item(p.items(), [&] { return Scratch<T>(p, true); }, item);
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

at::Tensor or_undefined(const c10::optional<at::Tensor>& x) {
  return x.has_value() ? *x : at::Tensor();
}

// A low-rank delta: dt (batch, rank, length) and dt_weight (dim, rank), contiguous.
void check_low_rank(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& dt_weight) {
  if (!dt_weight.defined()) {
    TORCH_CHECK(delta.sizes() == u.sizes(), "selective_scan: delta must match u");
    return;
  }
  TORCH_CHECK(dt_weight.dim() == 2 && dt_weight.size(0) == u.size(1) && dt_weight.is_contiguous(),
              "selective_scan: dt_weight must be a contiguous (dim, rank) tensor");
  TORCH_CHECK(dt_weight.size(1) <= 128, "selective_scan: dt_weight: rank up to 128, got ",
              dt_weight.size(1));
  TORCH_CHECK(delta.dim() == 3 && delta.size(0) == u.size(0) &&
                  delta.size(1) == dt_weight.size(1) && delta.size(2) == u.size(2),
              "selective_scan: with dt_weight, delta is dt: (batch, rank, length)");
}

// Instantiate the fixed-state-count fast path for the usual d_state = 16.
template <typename F16, typename FAny>
void with_states(int64_t states, const F16& f16, const FAny& fany) {
  if (states == kLanes)
    f16();
  else
    fany();
}

std::vector<at::Tensor> scan_forward(const at::Tensor& u, const at::Tensor& delta,
                                     const at::Tensor& A, const at::Tensor& B,
                                     const at::Tensor& C, const c10::optional<at::Tensor>& D_opt,
                                     const c10::optional<at::Tensor>& z_opt,
                                     const c10::optional<at::Tensor>& bias_opt, bool softplus,
                                     bool reverse, int64_t chunk, double scale,
                                     const c10::optional<at::Tensor>& out_opt, bool accumulate,
                                     const c10::optional<at::Tensor>& dt_weight_opt,
                                     const c10::optional<at::Tensor>& states_opt,
                                     bool keep_states) {
  const at::Tensor D = or_undefined(D_opt), z = or_undefined(z_opt), bias = or_undefined(bias_opt);
  const at::Tensor dt_weight = or_undefined(dt_weight_opt);
  at::Tensor out = or_undefined(out_opt);
  check_inputs(u, {delta, A, B, C, D, z, bias, out, dt_weight});
  check_low_rank(u, delta, dt_weight);
  TORCH_CHECK(A.is_contiguous() && (!D.defined() || D.is_contiguous()) &&
                  (!bias.defined() || bias.is_contiguous()),
              "selective_scan: A, D and delta_bias must be contiguous");
  TORCH_CHECK(!out.defined() || out.sizes() == u.sizes(), "selective_scan: out must match u");
  TORCH_CHECK(out.defined() || !accumulate, "selective_scan: accumulate needs an out tensor");
  if (!out.defined()) out = at::empty_like(u);
  at::Tensor last_state = at::empty({u.size(0), A.size(1), u.size(1)}, u.options());
  const int64_t chunks = std::max<int64_t>(1, (u.size(2) + chunk - 1) / chunk);
  // The states the backward restarts from, written into states_opt if given (a caller can
  // place its long-lived tensors before its temporary ones); an inference call needs none.
  const std::vector<int64_t> states_shape =
      keep_states ? std::vector<int64_t>{u.size(0), chunks, A.size(1), u.size(1)}
                  : std::vector<int64_t>{0};
  at::Tensor chunk_states =
      states_opt.has_value() ? *states_opt : at::empty(states_shape, u.options());
  TORCH_CHECK(chunk_states.sizes() == at::IntArrayRef(states_shape) &&
                  chunk_states.is_contiguous() && chunk_states.scalar_type() == u.scalar_type(),
              "selective_scan: states must be a contiguous ", states_shape, " tensor");
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_forward", [&] {
    const auto p = make_problem<scalar_t>(u, delta, A, B, C, D, z, bias, softplus, reverse, chunk,
                                          scale, dt_weight);
    const Strided<scalar_t> out_view(out);
    scalar_t* last = last_state.data_ptr<scalar_t>();
    scalar_t* saved = keep_states ? chunk_states.data_ptr<scalar_t>() : nullptr;
    with_states(
        p.states, [&] { forward_kernel<scalar_t, kLanes>(p, out_view, accumulate, last, saved); },
        [&] { forward_kernel<scalar_t, 0>(p, out_view, accumulate, last, saved); });
  });
  return {out, last_state.transpose(1, 2), chunk_states};
}

std::vector<at::Tensor> scan_backward(const at::Tensor& dout,
                                      const c10::optional<at::Tensor>& dlast_opt,
                                      const at::Tensor& u, const at::Tensor& delta,
                                      const at::Tensor& A, const at::Tensor& B,
                                      const at::Tensor& C, const c10::optional<at::Tensor>& D_opt,
                                      const c10::optional<at::Tensor>& z_opt,
                                      const c10::optional<at::Tensor>& bias_opt,
                                      const at::Tensor& chunk_states, bool softplus, bool reverse,
                                      int64_t chunk, double scale,
                                      const c10::optional<at::Tensor>& du_opt,
                                      const c10::optional<at::Tensor>& ddelta_opt,
                                      const c10::optional<at::Tensor>& dz_opt,
                                      const c10::optional<at::Tensor>& y_opt, bool accumulate,
                                      bool accumulate_du,
                                      const c10::optional<at::Tensor>& dt_weight_opt) {
  const at::Tensor D = or_undefined(D_opt), z = or_undefined(z_opt), bias = or_undefined(bias_opt);
  const at::Tensor dt_weight = or_undefined(dt_weight_opt);
  at::Tensor dlast = or_undefined(dlast_opt);
  // Optional destinations (any (batch, dim, length) views): written, or added to with
  // `accumulate` (dz, y) and `accumulate_du` (du, ddelta); the missing ones are allocated.
  // y receives the recomputed output.
  at::Tensor du = or_undefined(du_opt), ddelta = or_undefined(ddelta_opt);
  at::Tensor dz = or_undefined(dz_opt), y = or_undefined(y_opt);
  check_inputs(u, {dout, delta, A, B, C, D, z, bias, chunk_states, du, ddelta, dz, y, dt_weight});
  check_low_rank(u, delta, dt_weight);
  TORCH_CHECK(!dt_weight.defined() || !ddelta.defined(),
              "selective_scan: a low-rank delta's gradient is d dt, not d delta");
  for (const auto& t : {du, ddelta, dz, y})
    TORCH_CHECK(!t.defined() || t.sizes() == u.sizes(),
                "selective_scan: output tensors must match u's shape");
  TORCH_CHECK(z.defined() || !dz.defined(), "selective_scan: dz given without z");
  if (dlast.defined()) dlast = dlast.to(u.scalar_type()).transpose(1, 2).contiguous();
  const int64_t batch = u.size(0), dim = u.size(1), length = u.size(2), states = A.size(1);
  const bool add_du = accumulate_du && du.defined();
  const bool add_ddelta = accumulate_du && ddelta.defined();
  const bool add_dz = accumulate && dz.defined(), add_y = accumulate && y.defined();
  if (!du.defined()) du = at::empty_like(u);
  if (!ddelta.defined() && !dt_weight.defined()) ddelta = at::empty_like(delta);
  if (z.defined() && !dz.defined()) dz = at::empty_like(z);
  // dB/dC are sums over channels, one (length, states) slice per work item, added up over
  // the channel groups below and returned as (batch, states, length) views.
  const int64_t blocks = (dim + kLanes - 1) / kLanes, groups = channel_groups(batch, blocks);
  at::Tensor dB = at::zeros({batch, groups, length, states}, u.options());
  at::Tensor dC = at::zeros({batch, groups, length, states}, u.options());
  const auto f64 = u.options().dtype(at::kDouble);
  at::Tensor dA = at::zeros({batch, blocks, states, kLanes}, f64);
  at::Tensor dD = at::zeros({batch, blocks, kLanes}, f64), dbias = at::zeros_like(dD);
  // Low-rank delta: d dt like dB (per work item, summed over groups), d dt_weight like dA.
  const int64_t rank = dt_weight.defined() ? dt_weight.size(1) : 0;
  at::Tensor ddt, d_dt_weight;
  if (rank) {
    ddt = at::zeros({batch, groups, length, rank}, u.options());
    d_dt_weight = at::zeros({batch, blocks, rank, kLanes}, f64);
  }
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_backward", [&] {
    const auto p = make_problem<scalar_t>(u, delta, A, B, C, D, z, bias, softplus, reverse, chunk,
                                          scale, dt_weight);
    Gradients<scalar_t> g;
    g.du = Strided<scalar_t>(du);
    g.ddelta = Strided<scalar_t>(ddelta);
    g.dz = Strided<scalar_t>(dz);
    g.dout = Strided<scalar_t>(dout);
    g.y = Strided<scalar_t>(y);
    g.add_du = add_du;
    g.add_ddelta = add_ddelta;
    g.add_dz = add_dz;
    g.add_y = add_y;
    g.dlast = dlast.defined() ? dlast.data_ptr<scalar_t>() : nullptr;
    g.dB = dB.data_ptr<scalar_t>();
    g.dC = dC.data_ptr<scalar_t>();
    g.dA = dA.data_ptr<double>();
    g.dD = dD.data_ptr<double>();
    g.dbias = dbias.data_ptr<double>();
    if (rank) {
      g.ddt = ddt.data_ptr<scalar_t>();
      g.d_dt_weight = d_dt_weight.data_ptr<double>();
    }
    const scalar_t* saved = chunk_states.data_ptr<scalar_t>();
    with_states(
        p.states, [&] { backward_kernel<scalar_t, kLanes>(p, g, saved); },
        [&] { backward_kernel<scalar_t, 0>(p, g, saved); });
  });
  // Per-channel sums: add the batch elements in order, (block, lane) -> channel.
  const auto dtype = u.scalar_type();
  auto per_channel = [&](const at::Tensor& sums) {
    return sums.sum(0).reshape({blocks * kLanes}).narrow(0, 0, dim).to(dtype);
  };
  auto over_groups = [&](const at::Tensor& t) {  // (batch, rows, length) view
    return (groups == 1 ? t.select(1, 0) : t.sum(1)).transpose(1, 2);
  };
  auto per_row = [&](const at::Tensor& sums, int64_t rows) {  // (dim, rows)
    return sums.sum(0).transpose(1, 2).reshape({blocks * kLanes, rows}).narrow(0, 0, dim).to(dtype);
  };
  return {du,
          rank ? over_groups(ddt) : ddelta,
          per_row(dA, states),
          over_groups(dB),
          over_groups(dC),
          D.defined() ? per_channel(dD) : at::Tensor(),
          dz,
          bias.defined() ? per_channel(dbias) : at::Tensor(),
          rank ? per_row(d_dt_weight, rank) : at::Tensor()};
}

}  // namespace

void bind_selective_scan(pybind11::module_& m) {
  m.def("scan_forward", &scan_forward, "out, last_state, chunk_states");
  m.def("scan_backward", &scan_backward,
        "du, ddelta (d dt with dt_weight), dA, dB, dC, dD, dz, ddelta_bias, d dt_weight");
}

}  // namespace ssamba
