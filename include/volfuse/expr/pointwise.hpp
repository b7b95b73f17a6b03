// Pointwise epilogues applied to the batch-norm output inside the same loop:
// `vf::identity` (plain BatchNorm3d) and `vf::relu` (BatchNorm3d -> ReLU fused).
// Each knows its forward on a vector and how a gradient passes through it.
#pragma once

#include "../core/config.hpp"

#include <string_view>
#include <type_traits>

#include "../simd/vec.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS::expr {

/// A vector of the element types the kernels run on.
template <class T>
concept simd_vec = std::is_same_v<std::remove_cvref_t<T>, simd::fvec> || std::is_same_v<std::remove_cvref_t<T>, simd::dvec>;
template <class T>
concept operand_like = !simd_vec<T>;

struct identity_t {
    static constexpr std::string_view name = "identity";
    template <simd_vec V>
    V operator()(V v) const noexcept { return v; }
    /// Applied to a view or an expression: builds a node (expr/nodes.hpp).
    template <class A>
        requires operand_like<A>
    constexpr auto operator()(const A& a) const;
    /// Gradient w.r.t. the pre-activation `pre`, given the gradient `g` of the output.
    template <simd_vec V>
    V grad(V /*pre*/, V g) const noexcept { return g; }
};

struct relu_t {
    static constexpr std::string_view name = "relu";
    /// PyTorch's relu is `x < 0 ? 0 : x`: keeps -0.0 and NaN (std::max would not).
    template <simd_vec V>
    V operator()(V v) const noexcept
    {
        return xsimd::select(v < V(0), V(0), v);
    }
    /// Applied to a view or an expression: builds a node (expr/nodes.hpp).
    template <class A>
        requires operand_like<A>
    constexpr auto operator()(const A& a) const;
    /// threshold_backward(g, out, 0): zero where out <= 0.  out <= 0 exactly when
    /// pre <= 0 (including -0.0); NaN outputs pass their gradient, as in PyTorch.
    template <simd_vec V>
    V grad(V pre, V g) const noexcept
    {
        return xsimd::select(pre <= V(0), V(0), g);
    }
};

/// An epilogue: forward and gradient on vectors of every element type.
template <class E>
concept epilogue = requires(const E& e, simd::fvec v, simd::dvec d) {
    { e(v) } -> std::same_as<simd::fvec>;
    { e.grad(v, v) } -> std::same_as<simd::fvec>;
    { e(d) } -> std::same_as<simd::dvec>;
    { e.grad(d, d) } -> std::same_as<simd::dvec>;
    E::name;
};

} // namespace volfuse::expr

namespace volfuse::inline VOLFUSE_ISA_NS {
inline constexpr expr::identity_t identity{};
inline constexpr expr::relu_t relu{};
} // namespace volfuse
