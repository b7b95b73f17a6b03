// The runtime-shaped conv kernels, compiled once for every test binary (each test TU is built
// with VOLFUSE_EXTERN_FALLBACK_KERNELS and skips them): the tests' build time.
#include <volfuse/registry/fallback_kernels.hpp>
