// Expression nodes: inert descriptions of what to compute (no loops here; the
// evaluator in expr/evaluate.hpp is the only place that turns them into kernels).
//   vf::relu(bn(X))                       batch norm (module state) then ReLU
//   vf::relu(bn(conv(X)))                 Conv3d -> BatchNorm3d -> ReLU (the fused block)
//   vf::channel_affine(X, scale, shift)   y = x * scale[c] + shift[c]
//   vf::relu(X)                           pointwise on a view
#pragma once

#include "../core/config.hpp"

#include <span>
#include <type_traits>

#include "../shape/view.hpp"
#include "pointwise.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS::expr {

/// Leaf: a view.
template <class V>
struct tensor {
    using view_type = V;
    V view;
};
/// The output of a convolution module (Conv3d) applied to `In` (a tensor).
template <class Module, class In>
struct conv_output {
    Module* module;
    In in;
};
/// Batch norm of `In` with a module's parameters and statistics (train or eval by the module's mode).
template <class Module, class In>
struct batch_norm {
    Module* module;
    In in;
};
/// A pointwise epilogue (identity_t, relu_t) applied to `In`.
template <class E, class In>
struct pointwise {
    E op;
    In in;
};
/// Per-channel y = x * scale[c] + shift[c] (eval batch norm folded, a conv's bias + BN, ...).
template <class In>
struct channel_affine {
    In in;
    std::span<const float> scale, shift;
};

template <class T>
inline constexpr bool is_node_v = false;
template <class V>
inline constexpr bool is_node_v<tensor<V>> = true;
template <class M, class I>
inline constexpr bool is_node_v<batch_norm<M, I>> = true;
template <class M, class I>
inline constexpr bool is_node_v<conv_output<M, I>> = true;
template <class E, class I>
inline constexpr bool is_node_v<pointwise<E, I>> = true;
template <class I>
inline constexpr bool is_node_v<channel_affine<I>> = true;

template <class T>
concept node = is_node_v<std::remove_cvref_t<T>>;
/// What an expression may be built from: a node or a view (lifted to a leaf).
template <class T>
concept operand = node<T> || is_view_v<std::remove_cvref_t<T>>;

template <operand A>
constexpr auto lift(const A& a)
{
    if constexpr (node<A>) return a;
    else return tensor<A>{a};
}

} // namespace volfuse::expr

namespace volfuse::inline VOLFUSE_ISA_NS {

// The epilogues applied to an expression build a node (applied to a vector, they compute).
template <class A>
    requires expr::operand_like<A>
constexpr auto expr::identity_t::operator()(const A& a) const
{
    return expr::pointwise<identity_t, decltype(expr::lift(a))>{*this, expr::lift(a)};
}
template <class A>
    requires expr::operand_like<A>
constexpr auto expr::relu_t::operator()(const A& a) const
{
    return expr::pointwise<relu_t, decltype(expr::lift(a))>{*this, expr::lift(a)};
}

/// y = x * scale[c] + shift[c] as an expression.
template <expr::operand A>
constexpr auto channel_affine(const A& a, std::span<const float> scale, std::span<const float> shift)
{
    return expr::channel_affine<decltype(expr::lift(a))>{expr::lift(a), scale, shift};
}

} // namespace volfuse
