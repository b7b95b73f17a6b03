// tensor_view: a non-owning view of user memory with a layout and a shape.
#pragma once

#include "../core/config.hpp"

#include <initializer_list>
#include <span>
#include <type_traits>

#include "layout.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

template <class T, class L, class S>
class tensor_view {
public:
    using value_type = T;
    using layout_type = L;
    using shape_type = S;

    constexpr tensor_view(T* data, S shape) noexcept : data_(data), shape_(shape) {}

    constexpr T* data() const noexcept { return data_; }
    constexpr const S& shape() const noexcept { return shape_; }
    constexpr auto numel() const noexcept { return shape_.numel(); }
    constexpr auto sizes() const noexcept { return shape_.sizes(); }
    static constexpr std::string_view layout_name() noexcept { return L::name; }
    /// Elements of memory the view spans (blocked layouts pad C to whole blocks).
    constexpr index_t storage() const noexcept { return storage_size<L>(shape_); }
    constexpr auto form() const noexcept { return L::form(shape_); }

    /// Element at logical index (n, c, d, h, w), whatever the layout.
    constexpr T& operator()(index_t n, index_t c, index_t d, index_t h, index_t w) const noexcept
    {
        return data_[offset<L>(shape_, n, c, d, h, w)];
    }

    /// Same memory and sizes with C's extent replaced (e.g. made static after a check).
    template <extent C2>
    constexpr auto with_channels(C2 c2) const noexcept
    {
        using S2 = decltype(shape_.with_channels(c2));
        return tensor_view<T, L, S2>(data_, shape_.with_channels(c2));
    }

    /// Read-only view of the same memory.
    constexpr tensor_view<const T, L, S> as_const() const noexcept { return {data_, shape_}; }

private:
    T* data_;
    S shape_;
};

template <class V>
inline constexpr bool is_view_v = false;
template <class T, class L, class S>
inline constexpr bool is_view_v<tensor_view<T, L, S>> = true;

namespace detail {
inline void check_rank(std::size_t rank)
{
    if (rank != 5)
        throw error("expected 5D input (got " + std::to_string(rank) + "D input)");
}
} // namespace detail

/// Views over memory in a given layout.  Each extent is an integer (dynamic) or
/// `vf::fix<N>` (static): `vf::ncdhw_view(p, N, vf::fix<64>, D, H, W)`.
template <class L, class T, class AN, class AC, class AD, class AH, class AW>
constexpr auto make_view(T* data, AN n, AC c, AD d, AH h, AW w)
{
    auto s = make_shape(n, c, d, h, w);
    return tensor_view<T, L, decltype(s)>(data, s);
}

template <class T, class... A>
    requires(sizeof...(A) == 5)
constexpr auto ncdhw_view(T* data, A... sizes) { return make_view<ncdhw_t>(data, sizes...); }
template <class T, class... A>
    requires(sizeof...(A) == 5)
constexpr auto ndhwc_view(T* data, A... sizes) { return make_view<ndhwc_t>(data, sizes...); }
/// oneDNN's blocked layout; `data` must hold N * ceil(C/16)*16 * D*H*W floats.
template <class T, class... A>
    requires(sizeof...(A) == 5)
constexpr auto nCdhw16c_view(T* data, A... sizes) { return make_view<nCdhw16c_t>(data, sizes...); }

/// Views from a run-time list of sizes (e.g. a torch tensor's `sizes()`): all
/// extents dynamic; a rank other than 5 is PyTorch's `expected 5D input` error.
template <class L, class T>
auto make_view(T* data, std::span<const index_t> sizes)
{
    detail::check_rank(sizes.size());
    return make_view<L>(data, sizes[0], sizes[1], sizes[2], sizes[3], sizes[4]);
}
template <class T>
auto ncdhw_view(T* data, std::span<const index_t> sizes) { return make_view<ncdhw_t>(data, sizes); }
template <class T>
auto ndhwc_view(T* data, std::span<const index_t> sizes) { return make_view<ndhwc_t>(data, sizes); }
template <class T>
auto ncdhw_view(T* data, std::initializer_list<index_t> sizes) { return make_view<ncdhw_t>(data, std::span(sizes.begin(), sizes.size())); }
template <class T>
auto ndhwc_view(T* data, std::initializer_list<index_t> sizes) { return make_view<ndhwc_t>(data, std::span(sizes.begin(), sizes.size())); }

/// A view type spelled with values: `vf::view_t<float, vf::ncdhw_t, vf::shape_t<dynamic, 64, 8, 8, 8>>`.
template <class T, class L, class S>
using view_t = tensor_view<T, L, S>;

} // namespace volfuse
