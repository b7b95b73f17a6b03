// volfuse: basic types shared by every layer of the library.
#pragma once

#include <cstdint>

#include <xsimd/config/xsimd_config.hpp>

// The instruction set this TU is compiled for (the one xsimd picks), as a name.  Everything of
// volfuse but volfuse::error and the registry's store lives in the inline namespace
// volfuse::isa_<name> (volfuse::BatchNorm3d is volfuse::isa_avx512bw::BatchNorm3d in an AVX-512
// TU): TUs built with different -march never share a symbol, so linking them together (a
// generated kernel library built with -march=native into an application built without) cannot
// mix their code, and the registry refuses kernels of another ISA (registry/registry.hpp).
#if XSIMD_WITH_AVX512BW
#define VOLFUSE_ISA avx512bw
#elif XSIMD_WITH_AVX512F
#define VOLFUSE_ISA avx512f
#elif XSIMD_WITH_FMA3_AVX2
#define VOLFUSE_ISA avx2_fma
#elif XSIMD_WITH_AVX2
#define VOLFUSE_ISA avx2
#elif XSIMD_WITH_FMA3_AVX
#define VOLFUSE_ISA avx_fma
#elif XSIMD_WITH_AVX
#define VOLFUSE_ISA avx
#elif XSIMD_WITH_SSE4_2
#define VOLFUSE_ISA sse4_2
#elif XSIMD_WITH_SSE2
#define VOLFUSE_ISA sse2
#else
#define VOLFUSE_ISA generic
#endif
#define VOLFUSE_CAT_(a, b) a##b
#define VOLFUSE_CAT(a, b) VOLFUSE_CAT_(a, b)
#define VOLFUSE_STR_(a) #a
#define VOLFUSE_STR(a) VOLFUSE_STR_(a)
#define VOLFUSE_ISA_NS VOLFUSE_CAT(isa_, VOLFUSE_ISA)
/// What registry entries are stamped with: the ISA, and the C++ library ABI their types use.
#if defined(_GLIBCXX_USE_CXX11_ABI) && _GLIBCXX_USE_CXX11_ABI == 0
#define VOLFUSE_ABI_STAMP VOLFUSE_STR(VOLFUSE_ISA) ", libstdc++ pre-C++11 ABI"
#else
#define VOLFUSE_ABI_STAMP VOLFUSE_STR(VOLFUSE_ISA) ", C++11 ABI"
#endif

namespace volfuse::inline VOLFUSE_ISA_NS {

/// Signed 64-bit index: every extent, stride and offset is an index_t, as in ATen.
using index_t = std::int64_t;

/// Marks an extent that is only known at run time (`shape_t<dynamic, 64, ...>`).
inline constexpr index_t dynamic = -1;

} // namespace volfuse
