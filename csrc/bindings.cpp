// Python bindings of riskfast._C.
//
// This is the only file that includes torch's Python headers. It uses
// torch/csrc/utils/pybind.h, which brings pybind11 (torch's copy) and the
// at::Tensor <-> torch.Tensor casters, instead of torch/extension.h, which adds
// the whole C++ frontend and more than doubles the compile time. Operators live
// in their own .cpp/.cu files that include only the ATen headers they need;
// declare them in a header and bind them here. CUDA entry points are bound
// under #ifdef RISKFAST_WITH_CUDA.

#include <torch/csrc/utils/pybind.h>
#include <torch/headeronly/version.h>

#include <string>

#include "noise_cpu.h"

#ifndef RISKFAST_TORCH_VERSION
#define RISKFAST_TORCH_VERSION TORCH_VERSION
#endif
#ifndef RISKFAST_TORCH_CUDA_VERSION
#define RISKFAST_TORCH_CUDA_VERSION ""
#endif
#ifndef RISKFAST_COMPILER
#define RISKFAST_COMPILER __VERSION__
#endif

namespace py = pybind11;

namespace {

// How this module was built; riskfast._extension.build_info() adds the runtime side.
py::dict build_info() {
  py::dict info;
  // torch.__version__ of the torch the build ran against (with its local tag, e.g.
  // "2.13.0+cpu"), to compare with the torch imported at run time.
  info["torch_version"] = std::string(RISKFAST_TORCH_VERSION);
  // The version in torch's C++ headers (no local tag).
  info["torch_header_version"] = std::string(TORCH_VERSION);
  const std::string torch_cuda = RISKFAST_TORCH_CUDA_VERSION;
  info["torch_cuda_version"] = torch_cuda.empty() ? py::object(py::none()) : py::str(torch_cuda);
#ifdef RISKFAST_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["compiler"] = std::string(RISKFAST_COMPILER);
#ifdef _GLIBCXX_USE_CXX11_ABI
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#else
  info["cxx11_abi"] = py::none();
#endif
  info["cplusplus"] = static_cast<long>(__cplusplus);
  // The operators of namespace "riskfast" and the devices each was compiled for.
  py::dict ops;
  for (const char* name : {"philox_normal_fill_", "accumulate_noise_", "transition_log_prob",
                           "transition_log_prob_backward", "transition_log_prob_into_"}) {
    py::list devices;
    devices.append("cpu");
#ifdef RISKFAST_WITH_CUDA
    devices.append("cuda");
#endif
    ops[name] = devices;
  }
  info["ops"] = ops;
  // The float32 math of the CPU noise stream: "mkl" or "aten" (noise_cpu.cpp).
  info["noise_math"] = std::string(riskfast::noise_math_name());
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Load torch's Python side first: the tensor casters need it, and importing
  // riskfast._C on its own must not leave it uninitialised.
  py::module_::import("torch");
  m.doc() = "Compiled operators of riskfast (C++ and, when built with CUDA, CUDA).";
  m.def("build_info", &build_info,
        "How this extension was built: the torch it was compiled against, whether CUDA "
        "sources were compiled, the compiler and the C++ ABI.");
}
