// Types shared by every layer of the kernels (binding, CPU, CUDA): dtype codes, output kinds,
// 3-D shapes.
#pragma once
#include <cstdint>

namespace atso {

enum DType : int { kFloat32 = 0, kFloat16 = 1 };

// Output kind of the network.
enum Kind : int { kLogits = 0, kProbabilities = 1 };

struct Shape3 {
  int64_t z, y, x;
};

}  // namespace atso
