// Reorders between layouts (ncdhw, ndhwc, nCdhw16c).  ncdhw <-> ndhwc is a per-image matrix
// transpose, done in L1-sized tiles; the blocked layout goes element by element with the loop
// order of the destination's memory (writes stream, reads gather), strides compile-time
// constants wherever the shape's extents are; images (and tiles) run in parallel.
#pragma once

#include "../core/config.hpp"

#include <algorithm>
#include <string>

#include "../core/checks.hpp"
#include "../core/error.hpp"
#include "../parallel/threads.hpp"
#include "../shape/view.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

/// dst = src, element by element in logical (n, c, d, h, w) terms, whatever the two
/// layouts.  Blocked padding lanes of dst are not written.
template <class VS, class VD>
void reorder(const VS& src, const VD& dst)
{
    static_assert(std::is_same_v<std::remove_const_t<typename VS::value_type>, typename VD::value_type>,
                  "vf::reorder: source and destination must have the same element type (and dst be writable)");
    const auto from = detail::operand_of(src, "reorder: source"), to = detail::operand_of(dst, "reorder: destination");
    if (from.sizes != to.sizes)
        throw error("reorder: destination has shape " + detail::sizes_str(to.sizes) + " but source has shape " +
                    detail::sizes_str(from.sizes));
    if (to.overlaps(from)) throw error("reorder: source and destination overlap");
    const auto& s = dst.shape();
    const index_t N = value_of(s.n()), C = value_of(s.c()), D = value_of(s.d()), H = value_of(s.h()),
                  W = value_of(s.w());
    using LD = typename VD::layout_type;
    using LS = typename VS::layout_type;
    using E = typename VD::value_type; // float or double
    constexpr bool plain_src = std::is_same_v<LS, ncdhw_t> || std::is_same_v<LS, ndhwc_t>;
    constexpr bool plain_dst = std::is_same_v<LD, ncdhw_t> || std::is_same_v<LD, ndhwc_t>;
    if constexpr (plain_src && plain_dst) {
        // Between ncdhw and ndhwc an image is a [C][P] <-> [P][C] matrix (P = D*H*W): copy it
        // whole when the layouts agree, else transpose it in tiles that stay in L1 (both the
        // gathering and the scattering side then touch a cache line per 16 elements, not per one).
        const index_t P = D * H * W;
        const E* sp = src.data();
        E* dp = dst.data();
        if constexpr (std::is_same_v<LS, LD>) {
            parallel::parallel_for(N, N * C * P, [&](index_t n) { std::copy(sp + n * C * P, sp + (n + 1) * C * P, dp + n * C * P); });
        } else {
            constexpr index_t T = 32;
            const index_t tiles = (P + T - 1) / T;
            parallel::parallel_for(N * tiles, N * C * P, [&](index_t t) {
                const index_t n = t / tiles, p0 = t % tiles * T, p1 = std::min(P, p0 + T);
                const E* sn = sp + n * C * P;
                E* dn = dp + n * C * P;
                for (index_t c0 = 0; c0 < C; c0 += T) {
                    const index_t c1 = std::min(C, c0 + T);
                    if constexpr (std::is_same_v<LD, ndhwc_t>) {
                        for (index_t p = p0; p < p1; ++p)
                            for (index_t c = c0; c < c1; ++c) dn[p * C + c] = sn[c * P + p];
                    } else {
                        for (index_t c = c0; c < c1; ++c)
                            for (index_t p = p0; p < p1; ++p) dn[c * P + p] = sn[p * C + c];
                    }
                }
            });
        }
        return;
    }
    if constexpr ((std::is_same_v<LS, nCdhw16c_t> && std::is_same_v<LD, ndhwc_t>) ||
                  (std::is_same_v<LS, ndhwc_t> && std::is_same_v<LD, nCdhw16c_t>)) {
        // nCdhw16c <-> NDHWC (the conv kernels' layout): per pixel, a block's 16 channels are
        // contiguous on both sides, one vector copy each (the last block's real lanes only).
        constexpr index_t B = nCdhw16c_t::block;
        const index_t P = D * H * W, CB = (C + B - 1) / B;
        const E* sp = src.data();
        E* dp = dst.data();
        parallel::parallel_for(N * CB, N * C * P, [&](index_t t) {
            const index_t n = t / CB, cb = t % CB, lanes = std::min(B, C - cb * B);
            const index_t blocked = (n * CB + cb) * P * B, plain = n * P * C + cb * B;
            auto copy = [&](auto width) {
                for (index_t p = 0; p < P; ++p) {
                    const index_t ps = std::is_same_v<LS, ndhwc_t> ? plain + p * C : blocked + p * B;
                    const index_t pd = std::is_same_v<LD, ndhwc_t> ? plain + p * C : blocked + p * B;
                    for (index_t l = 0; l < width; ++l) dp[pd + l] = sp[ps + l];
                }
            };
            if (lanes == B) copy(std::integral_constant<index_t, B>{});
            else copy(lanes);
        });
        return;
    }
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
