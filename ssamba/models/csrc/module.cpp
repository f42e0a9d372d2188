// The Python module of ssamba's CPU kernels, built by ssamba/models/scan.py on first use.
#include <torch/extension.h>

namespace ssamba {
void bind_selective_scan(pybind11::module_& m);
void bind_causal_conv1d(pybind11::module_& m);
}  // namespace ssamba

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ssamba CPU kernels: selective scan and depthwise causal conv1d + silu";
  ssamba::bind_selective_scan(m);
  ssamba::bind_causal_conv1d(m);
}
