// A module's trainable tensor as an optimizer sees it (torch.nn.Parameter with its .grad):
// the values and the gradient the module accumulates, both owned by the module.
#pragma once

#include <span>
#include <string>

#include "../core/config.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

struct parameter {
    std::string name;       ///< PyTorch's state_dict key within the module ("weight", "0.bias", ...)
    std::span<float> value; ///< the parameter
    std::span<float> grad;  ///< its accumulated gradient (same size)
};

} // namespace volfuse
