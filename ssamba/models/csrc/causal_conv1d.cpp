// Depthwise causal conv1d + silu on CPU, forward and hand-written backward: the short
// convolution in front of Mamba's selective scan.
//
//   causal:      out[b, d, t] = silu(bias[d] + sum_k w[d, k] * x[b, d, t - (K - 1) + k])
//   look-ahead:  out[b, d, t] = silu(bias[d] + sum_k w[d, k] * x[b, d, t + (K - 1) - k])
//
// The look-ahead conv is the causal conv of the time-reversed sequence (the backward
// direction of a bidirectional mixer), so both run the same code reading time backwards.
// x is any (batch, dim, length) view, typically the channels-last x half of in_proj's
// output; out and dx are channels-last ((B, L, D) memory seen as (B, D, L)), the layout
// x_proj and the scan read without copies. Versus PyTorch's depthwise conv1d + silu this
// drops the contiguous copies, the padded output and its slice, and the separate silu
// passes: one pass over x forward, two over dout backward.
//
// Work items are (batch element, segment of kSegment steps), vectorised over 16 channels;
// the backward keeps per-task sums of dw and dbias, added in task order.

#include <type_traits>
#include <vector>

#include "simd.h"

namespace ssamba {
namespace {

constexpr int64_t kSegment = 64;  // steps per work item
constexpr int64_t kMaxTaps = 16;

template <typename T>
struct Conv {
  int64_t batch, dim, length, taps, blocks, segments;
  int64_t full_blocks;  // blocks with all 16 lanes in use
  bool look_ahead;
  Strided<T> x;
  std::vector<Vec<T>> w, bias;  // (block, tap) and (block) vectors, zero in padding lanes
  std::vector<T> zeros;         // a row of zeros: x outside the sequence, for dense reads

  Conv(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& b, bool reverse)
      : batch(input.size(0)),
        dim(input.size(1)),
        length(input.size(2)),
        taps(weight.size(1)),
        blocks((dim + kLanes - 1) / kLanes),
        segments((length + kSegment - 1) / kSegment),
        full_blocks(dim / kLanes),
        look_ahead(reverse),
        x(input),
        w(blocks * taps),
        bias(blocks),
        zeros(dim, T(0)) {
    const T* wp = weight.data_ptr<T>();
    const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
    for (int64_t d = 0; d < dim; ++d) {
      for (int64_t k = 0; k < taps; ++k) w[(d / kLanes) * taps + k][d % kLanes] = wp[d * taps + k];
      if (bp) bias[d / kLanes][d % kLanes] = bp[d];
    }
  }

  // Positions count steps in the direction the conv looks back along.
  int64_t time_at(int64_t position) const {
    return look_ahead ? length - 1 - position : position;
  }
  int64_t lanes(int64_t j) const { return std::min(kLanes, dim - j * kLanes); }

  // The channels of a (batch, dim, length) view at one position: a pointer to channel 0
  // (channel c at row[c * t.sr]), or null outside the sequence, which reads as zeros.
  const T* row(const Strided<T>& t, int64_t b, int64_t position) const {
    if (position < 0 || position >= length) return nullptr;
    return &t.at(b, 0, time_at(position));
  }

  // Channels [16j, 16j + 16) of a row; one vector load for channels-last data.
  Vec<T> read(const T* r, int64_t channel_stride, int64_t j) const {
    if (r == nullptr) return Vec<T>{};
    if (channel_stride == 1 && lanes(j) == kLanes) return load(r + j * kLanes);
    Vec<T> v{};
    for (int64_t l = 0; l < lanes(j); ++l) v[l] = r[(j * kLanes + l) * channel_stride];
    return v;
  }

  // Block j of a (batch, dim, length) view at a position, or with `add` added to it (the
  // second direction of a bidirectional mixer adds its dx to the first one's).
  void write(const Strided<T>& out, int64_t b, int64_t position, int64_t j, const Vec<T>& v,
             bool add = false) const {
    T* p = &out.at(b, j * kLanes, time_at(position));
    if (out.sr == 1 && lanes(j) == kLanes) {
      store(p, add ? load(p) + v : v);
    } else {
      for (int64_t l = 0; l < lanes(j); ++l) {
        T& r = p[l * out.sr];
        r = add ? r + v[l] : v[l];
      }
    }
  }

  // The K rows of x a position reads: rows[k] = x at position - (K - 1) + k. Outside the
  // sequence: null, or with `dense` (channels-last x) a row of zeros.
  void input_rows(int64_t b, int64_t position, const T** rows, bool dense) const {
    for (int64_t k = 0; k < taps; ++k) {
      rows[k] = row(x, b, position - (taps - 1) + k);
      if (dense && rows[k] == nullptr) rows[k] = zeros.data();
    }
  }

  // bias + sum_k w_k x[position - (K - 1) + k] for block j, before the silu. kTaps > 0 fixes
  // the tap count at compile time; kDense: channels-last x, rows never null, and j a full
  // block, so each tap is one vector load.
  template <int kTaps, bool kDense>
  Vec<T> pre_activation(const T* const* rows, int64_t j) const {
    const int64_t K = kTaps > 0 ? kTaps : taps;
    Vec<T> acc = bias[j];
    for (int64_t k = 0; k < K; ++k)
      acc += w[j * K + k] * (kDense ? load(rows[k] + j * kLanes) : read(rows[k], x.sr, j));
    return acc;
  }
};

// Call f(taps, dense) with compile-time constants: the usual 4 taps (Mamba's d_conv) on
// channels-last tensors get their own code, anything else run-time taps and strides.
template <typename F>
void with_layout(int64_t taps, bool dense, const F& f) {
  using Four = std::integral_constant<int, 4>;
  using Any = std::integral_constant<int, 0>;
  if (taps == 4 && dense)
    f(Four{}, std::true_type{});
  else if (dense)
    f(Any{}, std::true_type{});
  else
    f(Any{}, std::false_type{});
}

template <typename T, int kTaps, bool kDense>
void conv_forward_kernel(const Conv<T>& c, const Strided<T>& out) {
  const int64_t items = c.batch * c.segments;
  // Dense: the full blocks of a channels-last row in one loop of vector loads and stores.
  const int64_t fast = kDense ? c.full_blocks : 0;
  for_each_task(items, task_count(items), [&](int64_t, int64_t first, int64_t last) {
    std::vector<const T*> rows(c.taps);
    for (int64_t item = first; item < last; ++item) {
      const int64_t b = item / c.segments, p0 = (item % c.segments) * kSegment;
      for (int64_t p = p0; p < std::min(c.length, p0 + kSegment); ++p) {
        c.input_rows(b, p, rows.data(), kDense);
        T* o = &out.at(b, 0, c.time_at(p));
        for (int64_t j = 0; j < fast; ++j)
          store(o + j * kLanes, silu<T>(c.template pre_activation<kTaps, true>(rows.data(), j)));
        for (int64_t j = fast; j < c.blocks; ++j)
          c.write(out, b, p, j, silu<T>(c.template pre_activation<kTaps, false>(rows.data(), j)));
      }
    }
  });
}

// Per item: d(pre-activation) over the segment and the K - 1 steps after it (dx at a
// position sums the K outputs that read it), then dx, and the segment's share of dw and
// dbias.
template <typename T, int kTaps, bool kDense>
void conv_backward_kernel(const Conv<T>& c, const Strided<T>& dout, const Strided<T>& dx,
                          bool add_dx, double* dw, double* dbias) {
  using V = Vec<T>;
  const int64_t items = c.batch * c.segments, tasks = task_count(items);
  const int64_t K = kTaps > 0 ? kTaps : c.taps, fast = kDense ? c.full_blocks : 0;
  std::vector<double> partial_w(tasks * c.blocks * K * kLanes, 0.0);
  std::vector<double> partial_b(tasks * c.blocks * kLanes, 0.0);
  for_each_task(items, tasks, [&](int64_t task, int64_t first, int64_t last) {
    std::vector<V> dpre((kSegment + K - 1) * c.blocks), sum_w(c.blocks * K), sum_b(c.blocks);
    std::vector<const T*> rows(K);
    for (int64_t item = first; item < last; ++item) {
      const int64_t b = item / c.segments, p0 = (item % c.segments) * kSegment;
      const int64_t p1 = std::min(c.length, p0 + kSegment);
      const int64_t halo_end = std::min(c.length, p1 + K - 1);
      for (int64_t p = p0; p < halo_end; ++p) {
        c.input_rows(b, p, rows.data(), kDense);
        const T* g = c.row(dout, b, p);
        V* d = &dpre[(p - p0) * c.blocks];
        // d silu(a)/da = sigmoid(a) * (1 + a * (1 - sigmoid(a)))
        for (int64_t j = 0; j < fast; ++j) {
          const V a = c.template pre_activation<kTaps, true>(rows.data(), j);
          const V s = Simd<T>::sigmoid(a);
          d[j] = load(g + j * kLanes) * s * (T(1) + a * (T(1) - s));
        }
        for (int64_t j = fast; j < c.blocks; ++j) {
          const V a = c.template pre_activation<kTaps, false>(rows.data(), j);
          const V s = Simd<T>::sigmoid(a);
          d[j] = c.read(g, dout.sr, j) * s * (T(1) + a * (T(1) - s));
        }
      }
      std::fill(sum_w.begin(), sum_w.end(), V{});
      std::fill(sum_b.begin(), sum_b.end(), V{});
      for (int64_t p = p0; p < p1; ++p) {
        c.input_rows(b, p, rows.data(), kDense);
        // x at position p feeds the output at q_k = p + (K - 1) - k through tap k.
        // Only taps k >= first_valid reach an output inside the sequence (q_k < halo_end).
        const int64_t first_valid = std::max<int64_t>(0, p + K - halo_end);
        const V* d[kTaps > 0 ? kTaps : kMaxTaps];
        for (int64_t k = first_valid; k < K; ++k) d[k] = &dpre[(p + (K - 1) - k - p0) * c.blocks];
        T* o = kDense ? &dx.at(b, 0, c.time_at(p)) : nullptr;
        for (int64_t j = 0; j < c.blocks; ++j) {
          const bool dense_block = kDense && j < fast;
          const V g = dpre[(p - p0) * c.blocks + j];
          V acc{};
          for (int64_t k = first_valid; k < K; ++k) acc += c.w[j * K + k] * d[k][j];
          for (int64_t k = 0; k < K; ++k)
            sum_w[j * K + k] +=
                g * (dense_block ? load(rows[k] + j * kLanes) : c.read(rows[k], c.x.sr, j));
          if (dense_block)
            store(o + j * kLanes, add_dx ? load(o + j * kLanes) + acc : acc);
          else
            c.write(dx, b, p, j, acc, add_dx);
          sum_b[j] += g;
        }
      }
      double* task_w = &partial_w[task * c.blocks * K * kLanes];
      double* task_b = &partial_b[task * c.blocks * kLanes];
      for (int64_t i = 0; i < c.blocks * K; ++i)
        for (int64_t l = 0; l < kLanes; ++l) task_w[i * kLanes + l] += sum_w[i][l];
      for (int64_t j = 0; j < c.blocks; ++j)
        for (int64_t l = 0; l < kLanes; ++l) task_b[j * kLanes + l] += sum_b[j][l];
    }
  });
  for (int64_t d = 0; d < c.dim; ++d) {  // tasks' sums, added in task order
    const int64_t j = d / kLanes, l = d % kLanes;
    double total_b = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      double total = 0.0;
      for (int64_t task = 0; task < tasks; ++task)
        total += partial_w[((task * c.blocks + j) * K + k) * kLanes + l];
      dw[d * K + k] = total;
    }
    for (int64_t task = 0; task < tasks; ++task)
      total_b += partial_b[(task * c.blocks + j) * kLanes + l];
    dbias[d] = total_b;
  }
}

void check_conv_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3,
              "causal_conv1d: x must be a CPU (batch, dim, length) tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "causal_conv1d: expected float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "causal_conv1d: weight must be a contiguous (dim, taps) tensor");
  TORCH_CHECK(weight.size(1) >= 1 && weight.size(1) <= kMaxTaps, "causal_conv1d: 1 to ",
              kMaxTaps, " taps, got ", weight.size(1));
  TORCH_CHECK(!bias.defined() || (bias.numel() == x.size(1) && bias.is_contiguous()),
              "causal_conv1d: bias must be a contiguous (dim,) tensor");
  for (const auto& t : {weight, bias})
    TORCH_CHECK(!t.defined() || t.scalar_type() == x.scalar_type(),
                "causal_conv1d: weight and bias must share x's dtype");
}

// (B, L, D) memory seen as (B, D, L).
at::Tensor channels_last_like(const at::Tensor& x) {
  return at::empty({x.size(0), x.size(2), x.size(1)}, x.options()).transpose(1, 2);
}

// out_opt: a (batch, dim, length) tensor to write into (a caller's workspace), else the
// output is allocated channels-last.
at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias_opt, bool look_ahead,
                        const c10::optional<at::Tensor>& out_opt) {
  const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
  check_conv_inputs(x, weight, bias);
  at::Tensor out = out_opt.has_value() ? *out_opt : channels_last_like(x);
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "causal_conv1d: out must match x");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_forward", [&] {
    const Conv<scalar_t> conv(x, weight, bias, look_ahead);
    with_layout(conv.taps, x.stride(1) == 1 && out.stride(1) == 1, [&](auto taps, auto dense) {
      conv_forward_kernel<scalar_t, decltype(taps)::value, decltype(dense)::value>(
          conv, Strided<scalar_t>(out));
    });
  });
  return out;
}

// dx_opt: a (batch, dim, length) view to write dx into (e.g. the x half of the gradient of
// in_proj's output), or to add it to with `accumulate`; else dx is allocated channels-last.
std::vector<at::Tensor> conv_backward(const at::Tensor& dout, const at::Tensor& x,
                                      const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias_opt, bool look_ahead,
                                      const c10::optional<at::Tensor>& dx_opt, bool accumulate) {
  const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
  check_conv_inputs(x, weight, bias);
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type(),
              "causal_conv1d: dout must match x");
  at::Tensor dx = dx_opt.has_value() ? *dx_opt : channels_last_like(x);
  TORCH_CHECK(dx.sizes() == x.sizes() && dx.scalar_type() == x.scalar_type(),
              "causal_conv1d: dx must match x");
  TORCH_CHECK(dx_opt.has_value() || !accumulate, "causal_conv1d: accumulate needs a dx tensor");
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor dw = at::empty(weight.sizes(), f64), dbias = at::empty({x.size(1)}, f64);
  const bool dense = x.stride(1) == 1 && dout.stride(1) == 1 && dx.stride(1) == 1;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_backward", [&] {
    const Conv<scalar_t> conv(x, weight, bias, look_ahead);
    with_layout(conv.taps, dense, [&](auto taps, auto is_dense) {
      conv_backward_kernel<scalar_t, decltype(taps)::value, decltype(is_dense)::value>(
          conv, Strided<scalar_t>(dout), Strided<scalar_t>(dx), accumulate,
          dw.data_ptr<double>(), dbias.data_ptr<double>());
    });
  });
  return {dx, dw.to(x.scalar_type()), bias.defined() ? dbias.to(x.scalar_type()) : at::Tensor()};
}

}  // namespace

void bind_causal_conv1d(pybind11::module_& m) {
  m.def("conv_forward", &conv_forward, "silu(depthwise causal conv1d): out");
  m.def("conv_backward", &conv_backward, "dx, dweight, dbias");
}

}  // namespace ssamba
