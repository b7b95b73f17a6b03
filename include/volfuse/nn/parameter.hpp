// A module's trainable tensor as an optimizer sees it (torch.nn.Parameter with its .grad):
// the values and the gradient the module accumulates, both owned by the module.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "../core/config.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

struct parameter {
    std::string name;       ///< PyTorch's state_dict key within the module ("weight", "0.bias", ...)
    std::span<float> value; ///< the parameter
    std::span<float> grad;  ///< its accumulated gradient (same size)
};

/// Appends a submodule's parameters to its parent's list, named as the parent's state_dict
/// names them (`prefix` "conv1." or "0.": "conv1.weight"), as torch.nn.Module.named_parameters.
inline void append_parameters(std::vector<parameter>& to, const std::string& prefix, const std::vector<parameter>& from)
{
    for (const parameter& q : from) to.push_back({prefix + q.name, q.value, q.grad});
}

} // namespace volfuse
