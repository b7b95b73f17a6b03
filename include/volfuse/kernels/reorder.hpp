// Reorders between layouts (ncdhw, ndhwc, nCdhw16c).  One template: the loop order
// follows the destination's memory order (writes stream, reads gather), strides are
// compile-time constants wherever the shape's extents are, and images run in parallel.
#pragma once

#include <string>

#include "../core/error.hpp"
#include "../parallel/threads.hpp"
#include "../shape/view.hpp"

namespace volfuse {

/// dst = src, element by element in logical (n, c, d, h, w) terms, whatever the two
/// layouts.  Blocked padding lanes of dst are not written.
template <class VS, class VD>
void reorder(const VS& src, const VD& dst)
{
    static_assert(std::is_same_v<std::remove_const_t<typename VS::value_type>, typename VD::value_type>,
                  "vf::reorder: source and destination must have the same element type (and dst be writable)");
    if (src.sizes() != dst.sizes())
        throw error("reorder: destination has shape " + dst.shape().str() + " but source has shape " +
                    src.shape().str());
    const index_t n_src = src.storage(), n_dst = dst.storage();
    const auto a = reinterpret_cast<std::uintptr_t>(src.data()), b = reinterpret_cast<std::uintptr_t>(dst.data());
    if (src.shape().numel() > 0 && a < b + n_dst * sizeof(float) && b < a + n_src * sizeof(float))
        throw error("reorder: source and destination overlap");
    const auto& s = dst.shape();
    const index_t N = value_of(s.n()), C = value_of(s.c()), D = value_of(s.d()), H = value_of(s.h()),
                  W = value_of(s.w());
    using LD = typename VD::layout_type;
    parallel::parallel_for(N, src.shape().numel(), [&](index_t n) {
        if constexpr (std::is_same_v<LD, ndhwc_t>) {
            for (index_t d = 0; d < D; ++d)
                for (index_t h = 0; h < H; ++h)
                    for (index_t w = 0; w < W; ++w)
                        for (index_t c = 0; c < C; ++c) dst(n, c, d, h, w) = src(n, c, d, h, w);
        } else if constexpr (std::is_same_v<LD, nCdhw16c_t>) {
            for (index_t cb = 0; cb < C; cb += nCdhw16c_t::block)
                for (index_t d = 0; d < D; ++d)
                    for (index_t h = 0; h < H; ++h)
                        for (index_t w = 0; w < W; ++w)
                            for (index_t c = cb; c < std::min(C, cb + nCdhw16c_t::block); ++c)
                                dst(n, c, d, h, w) = src(n, c, d, h, w);
        } else {
            for (index_t c = 0; c < C; ++c)
                for (index_t d = 0; d < D; ++d)
                    for (index_t h = 0; h < H; ++h)
                        for (index_t w = 0; w < W; ++w) dst(n, c, d, h, w) = src(n, c, d, h, w);
        }
    });
}

} // namespace volfuse
