// The only PYBIND11_MODULE of rlhf_fast._C: every kernel file registers itself
// with RLHF_FAST_REGISTER (see common.h), so adding an op never touches this file.
#include "common.h"

namespace rlhf_fast {
std::vector<RegisterFn>& registry() {
  static std::vector<RegisterFn> fns;
  return fns;
}
}  // namespace rlhf_fast

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlhf_fast C++ CPU kernels (raw-pointer interface; see rlhf_fast/_backend.py)";
#ifdef _OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
  for (auto fn : rlhf_fast::registry()) fn(m);
}
