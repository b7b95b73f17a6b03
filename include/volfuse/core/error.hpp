// volfuse::error: the one exception type the library throws for bad input.
#pragma once

#include <stdexcept>
#include <string>

namespace volfuse {

/// Thrown for invalid arguments (shapes, channel counts, aliasing, call order).
/// The message follows PyTorch's wording where PyTorch has one.  Whatever throws
/// it has changed nothing: module state and outputs are as they were.
class error : public std::invalid_argument {
public:
    explicit error(const std::string& what) : std::invalid_argument(what) {}
};

} // namespace volfuse
