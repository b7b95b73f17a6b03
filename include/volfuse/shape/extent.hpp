// Extents: a dimension's size, either static (a Hana integral constant, known to
// the compiler) or dynamic (an index_t known at run time).  Kernels are written
// once against "an extent"; the compiler specializes them for whichever it gets.
#pragma once

#include <concepts>
#include <type_traits>

#include <boost/hana/integral_constant.hpp>

#include "../core/config.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

namespace hana = boost::hana;

/// A compile-time extent of value V.
template <index_t V>
using fixed_t = hana::integral_constant<index_t, V>;

/// `vf::fix<64>`: spells a static extent where a size is expected (Eigen's `fix<N>`).
template <index_t V>
inline constexpr fixed_t<V> fix{};

/// Anything with a constant integral `::value` and no state: hana::int_c<8>,
/// std::integral_constant<int, 8>, vf::fix<8>.
template <class E>
concept static_extent = std::is_empty_v<E> && requires {
    { E::value } -> std::convertible_to<index_t>;
} && std::is_integral_v<std::remove_cv_t<decltype(E::value)>>;

template <class E>
concept extent = static_extent<E> || std::same_as<E, index_t>;

/// The extent type for a value: `dynamic` gives index_t, anything else fixed_t<V>.
template <index_t V>
using extent_t = std::conditional_t<V == dynamic, index_t, fixed_t<V>>;

/// Value of a static extent, or `dynamic` for a run-time one.
template <class E>
inline constexpr index_t static_value_v = [] {
    if constexpr (static_extent<E>) return static_cast<index_t>(E::value);
    else return dynamic;
}();

template <class E>
constexpr index_t value_of(E e) noexcept
{
    if constexpr (static_extent<E>) return static_cast<index_t>(E::value);
    else return static_cast<index_t>(e);
}

/// Normalizes a user argument to an extent: integers become dynamic, integral
/// constants of any integer type become fixed_t.
template <class A>
constexpr auto to_extent(A a) noexcept
{
    if constexpr (static_extent<A>) return fixed_t<static_cast<index_t>(A::value)>{};
    else {
        static_assert(std::is_integral_v<A>, "volfuse: an extent must be an integer or vf::fix<N>");
        return static_cast<index_t>(a);
    }
}

/// Product of two extents; static when both are.
template <extent A, extent B>
constexpr auto mul(A a, B b) noexcept
{
    if constexpr (static_extent<A> && static_extent<B>) return fixed_t<A::value * B::value>{};
    else return static_cast<index_t>(value_of(a) * value_of(b));
}

} // namespace volfuse
