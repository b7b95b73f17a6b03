// shape5: the (N, C, D, H, W) extents of a volumetric tensor, each static or dynamic,
// in one type.  Logical index order is always (n, c, d, h, w), as in PyTorch.
#pragma once

#include "../core/config.hpp"

#include <array>
#include <string>

#include <boost/hana/at.hpp>
#include <boost/hana/fold_left.hpp>
#include <boost/hana/tuple.hpp>
#include <boost/hana/unpack.hpp>

#include "../core/checks.hpp"
#include "../core/error.hpp"
#include "../core/format.hpp"
#include "extent.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

template <extent N, extent C, extent D, extent H, extent W>
class shape5 {
public:
    using extents_type = hana::tuple<N, C, D, H, W>;

    constexpr shape5() noexcept = default;
    constexpr shape5(N n, C c, D d, H h, W w) noexcept : ext_(n, c, d, h, w) {}

    constexpr auto n() const noexcept { return hana::at_c<0>(ext_); }
    constexpr auto c() const noexcept { return hana::at_c<1>(ext_); }
    constexpr auto d() const noexcept { return hana::at_c<2>(ext_); }
    constexpr auto h() const noexcept { return hana::at_c<3>(ext_); }
    constexpr auto w() const noexcept { return hana::at_c<4>(ext_); }
    constexpr const extents_type& extents() const noexcept { return ext_; }

    /// Static value per dimension (`dynamic` where only known at run time).
    static constexpr std::array<index_t, 5> static_sizes{static_value_v<N>, static_value_v<C>, static_value_v<D>,
                                                          static_value_v<H>, static_value_v<W>};
    static constexpr bool is_static = static_value_v<N> != dynamic && static_value_v<C> != dynamic &&
                                      static_value_v<D> != dynamic && static_value_v<H> != dynamic &&
                                      static_value_v<W> != dynamic;
    static constexpr bool static_channels = static_value_v<C> != dynamic;

    constexpr std::array<index_t, 5> sizes() const noexcept
    {
        return hana::unpack(ext_, [](auto... e) { return std::array<index_t, 5>{value_of(e)...}; });
    }
    /// Element count; static when every extent is.
    constexpr auto numel() const noexcept
    {
        return hana::fold_left(ext_, fix<1>, [](auto a, auto b) { return mul(a, b); });
    }
    /// D*H*W, the spatial volume.
    constexpr auto spatial() const noexcept { return mul(mul(d(), h()), w()); }

    /// The same shape with C replaced by another extent (e.g. a static one after a check).
    template <extent C2>
    constexpr shape5<N, C2, D, H, W> with_channels(C2 c2) const noexcept
    {
        return {n(), c2, d(), h(), w()};
    }

    std::string str() const { return detail::sizes_str(sizes()); }

    template <class S2>
    constexpr bool same_sizes(const S2& o) const noexcept { return sizes() == o.sizes(); }

private:
    extents_type ext_{};
};

/// Builds a shape from integers and/or vf::fix<N>; rejects negative extents and
/// element counts whose bytes do not fit in index_t.
template <class AN, class AC, class AD, class AH, class AW>
constexpr auto make_shape(AN n, AC c, AD d, AH h, AW w)
{
    auto s = shape5{to_extent(n), to_extent(c), to_extent(d), to_extent(h), to_extent(w)};
    detail::checked_numel(s.sizes()); // ATen's checks: no negative size, the bytes fit
    return s;
}

/// `vf::shape_t<dynamic, 64, dynamic, dynamic, dynamic>`: a shape type spelled with values.
template <index_t N, index_t C, index_t D, index_t H, index_t W>
using shape_t = shape5<extent_t<N>, extent_t<C>, extent_t<D>, extent_t<H>, extent_t<W>>;

} // namespace volfuse
