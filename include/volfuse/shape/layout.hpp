// Layouts: how a logical (n, c, d, h, w) index maps to memory.  Names follow
// oneDNN's tags (lower case = plain dims in memory order).  Strides are extents,
// so they are compile-time constants wherever the shape allows.
#pragma once

#include "../core/config.hpp"

#include <string_view>

#include <boost/hana/tuple.hpp>
#include <boost/hana/unpack.hpp>

#include "shape.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

/// Every plain layout is, per channel, a 3-D walk: element (o, c, i) lives at
/// ((o * channels) + c) * inner + i.  NCDHW: outer = N, inner = D*H*W.
/// NDHWC: outer = N*D*H*W, inner = 1.  Kernels are written against this form
/// and choose their vectorization from whether `inner` is statically 1.
template <extent O, extent C, extent I>
struct channel_form {
    O outer;
    C channels;
    I inner;

    /// Channels are the fastest-moving dimension: vectorize across channels.
    static constexpr bool channel_minor = static_value_v<I> == 1;
    static constexpr bool blocked = false;

    constexpr index_t count() const noexcept { return value_of(outer) * value_of(inner); }
};
template <class O, class C, class I>
channel_form(O, C, I) -> channel_form<O, C, I>;

/// Channels per block of the blocked layout (oneDNN's nCdhw16c; one AVX-512 vector of floats).
inline constexpr index_t channel_block = 16;

/// Blocked channels (oneDNN's nCdhw16c): element (n, c, s) of C channels and S = D*H*W
/// pixels lives at ((n * ceil(C/16) + c/16) * S + s) * 16 + c%16.  Kernels walk one
/// 16-channel block at a time, vectorizing across its channels.
template <extent O, extent C, extent I>
struct blocked_form {
    O outer;    // N
    C channels; // C (the last block may be partly padding)
    I inner;    // D*H*W
    static constexpr index_t block = channel_block;
    static constexpr bool channel_minor = false;
    static constexpr bool blocked = true;
    constexpr index_t count() const noexcept { return value_of(outer) * value_of(inner); }
    constexpr index_t blocks() const noexcept { return (value_of(channels) + block - 1) / block; }
};
template <class O, class C, class I>
blocked_form(O, C, I) -> blocked_form<O, C, I>;

/// NCDHW, PyTorch's default contiguous format.
struct ncdhw_t {
    static constexpr std::string_view name = "ncdhw";

    /// Strides in (n, c, d, h, w) order.
    template <class S>
    static constexpr auto strides(const S& s) noexcept
    {
        auto sw = fix<1>;
        auto sh = s.w();
        auto sd = mul(s.h(), s.w());
        auto sc = mul(s.d(), sd);
        auto sn = mul(s.c(), sc);
        return hana::make_tuple(sn, sc, sd, sh, sw);
    }
    template <class S>
    static constexpr auto form(const S& s) noexcept
    {
        return channel_form{s.n(), s.c(), s.spatial()};
    }
};

/// NDHWC, PyTorch's `channels_last_3d`.
struct ndhwc_t {
    static constexpr std::string_view name = "ndhwc";

    template <class S>
    static constexpr auto strides(const S& s) noexcept
    {
        auto sc = fix<1>;
        auto sw = s.c();
        auto sh = mul(s.w(), sw);
        auto sd = mul(s.h(), sh);
        auto sn = mul(s.d(), sd);
        return hana::make_tuple(sn, sc, sd, sh, sw);
    }
    template <class S>
    static constexpr auto form(const S& s) noexcept
    {
        return channel_form{mul(s.n(), s.spatial()), s.c(), fix<1>};
    }
};

/// oneDNN's nCdhw16c: [N][ceil(C/16)][D][H][W][16].  When C is not a multiple of 16 the
/// last block's extra lanes are padding: storage() counts them; kernels neither read nor
/// write them.
struct nCdhw16c_t {
    static constexpr std::string_view name = "nCdhw16c";
    static constexpr index_t block = channel_block;
    template <class S>
    static constexpr auto form(const S& s) noexcept
    {
        return blocked_form{s.n(), s.c(), s.spatial()};
    }
    template <class S>
    static constexpr index_t offset(const S& s, index_t n, index_t c, index_t d, index_t h, index_t w) noexcept
    {
        const index_t CB = (value_of(s.c()) + block - 1) / block, D = value_of(s.d()), H = value_of(s.h()),
                      W = value_of(s.w());
        return ((((n * CB + c / block) * D + d) * H + h) * W + w) * block + c % block;
    }
    /// Elements of memory the layout occupies (padding included).
    template <class S>
    static constexpr index_t storage(const S& s) noexcept
    {
        return value_of(s.n()) * ((value_of(s.c()) + block - 1) / block * block) * value_of(s.spatial());
    }
};

inline constexpr ncdhw_t ncdhw{};
inline constexpr ndhwc_t ndhwc{};
inline constexpr nCdhw16c_t nCdhw16c{};

template <class L>
concept plain_layout = std::same_as<L, ncdhw_t> || std::same_as<L, ndhwc_t>;

/// Offset of logical element (n, c, d, h, w) under layout L.
template <class L, class S>
constexpr index_t offset(const S& s, index_t n, index_t c, index_t d, index_t h, index_t w) noexcept
{
    if constexpr (plain_layout<L>) {
        return hana::unpack(L::strides(s), [&](auto sn, auto sc, auto sd, auto sh, auto sw) {
            return n * value_of(sn) + c * value_of(sc) + d * value_of(sd) + h * value_of(sh) + w * value_of(sw);
        });
    } else {
        return L::offset(s, n, c, d, h, w);
    }
}

/// Elements of memory a tensor of shape s occupies under layout L.
template <class L, class S>
constexpr index_t storage_size(const S& s) noexcept
{
    if constexpr (plain_layout<L>) return value_of(s.numel());
    else return L::storage(s);
}

} // namespace volfuse
