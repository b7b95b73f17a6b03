// volfuse: basic types shared by every layer of the library.
#pragma once

#include <cstdint>

namespace volfuse {

/// Signed 64-bit index: every extent, stride and offset is an index_t, as in ATen.
using index_t = std::int64_t;

/// Marks an extent that is only known at run time (`shape_t<dynamic, 64, ...>`).
inline constexpr index_t dynamic = -1;

} // namespace volfuse
