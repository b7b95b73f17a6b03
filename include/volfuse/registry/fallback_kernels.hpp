// The runtime-shaped conv kernels' explicit instantiation: include this in exactly one TU of a
// build whose other TUs define VOLFUSE_EXTERN_FALLBACK_KERNELS (they then skip instantiating
// them; see registry.hpp).
#pragma once

#include "registry.hpp"

template volfuse::registry::conv_kernels volfuse::registry::conv_kernels_for<volfuse::conv_spec{}>() noexcept;
