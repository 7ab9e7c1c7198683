// Declarations shared between the CPU noise operators and the bindings.
#pragma once

namespace riskfast {

// Which float32 math the CPU noise operators use: "mkl" (MKL's vector functions, as
// torch's CPU kernels) or "aten" (at::log/sqrt/sin/cos per chunk).
const char* noise_math_name();

}  // namespace riskfast
