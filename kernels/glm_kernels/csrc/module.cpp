// The Python module of the compiled CPU kernels (glm_kernels/cpu_compiled.py builds it): the decode model
// (decode_model.cpp), the prefill kernels (prefill_kernels.cpp) and the kernels for quantized weights
// (quant_kernels.cpp, which the decode model uses too), which share simd.h.
//
// One translation unit: the two files are included here rather than compiled apart, because torch's headers take
// most of the compile time and are then parsed once (measured on 2 cores: 63 s for one unit, 124 s for three).

#include "quant_kernels.cpp"
#include "decode_model.cpp"
#include "prefill_kernels.cpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled CPU kernels of the GLM workbench engine (see glm_kernels/cpu_compiled.py)";
  bind_decode_model(m);
  bind_prefill_kernels(m);
  bind_quant_kernels(m);
}
