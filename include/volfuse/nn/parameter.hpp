// A module's trainable tensor as an optimizer sees it (torch.nn.Parameter with its .grad):
// the values and the gradient the module accumulates, both owned by the module.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "../core/config.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

/// A parameter of element type T (a module's element type).
template <class T>
struct basic_parameter {
    std::string name;   ///< PyTorch's state_dict key within the module ("weight", "0.bias", ...)
    std::span<T> value; ///< the parameter
    std::span<T> grad;  ///< its accumulated gradient (same size)
};
using parameter = basic_parameter<float>;

/// Appends a submodule's parameters to its parent's list, named as the parent's state_dict
/// names them (`prefix` "conv1." or "0.": "conv1.weight"), as torch.nn.Module.named_parameters.
template <class T>
void append_parameters(std::vector<basic_parameter<T>>& to, const std::string& prefix,
                       const std::vector<basic_parameter<T>>& from)
{
    for (const basic_parameter<T>& q : from) to.push_back({prefix + q.name, q.value, q.grad});
}

} // namespace volfuse
