// The shape/layout DSL: what is known at compile time stays known, offsets match
// PyTorch's strides for both layouts, bad shapes are rejected.
#include <type_traits>

#include <boost/hana/at.hpp>

#include "support.hpp"

namespace hana = boost::hana;
using vf::dynamic;
template <class T>
using bare = std::remove_cvref_t<T>;

// --- compile time ------------------------------------------------------------
static_assert(vf::static_extent<vf::fixed_t<64>>);
static_assert(vf::static_extent<decltype(hana::int_c<8>)>);
static_assert(vf::static_extent<std::integral_constant<int, 8>>);
static_assert(!vf::static_extent<index_t>);
static_assert(std::is_same_v<vf::extent_t<dynamic>, index_t>);
static_assert(std::is_same_v<vf::extent_t<64>, vf::fixed_t<64>>);

using partly = vf::shape_t<dynamic, 64, dynamic, dynamic, dynamic>;
static_assert(partly::static_channels && !partly::is_static);
static_assert(partly::static_sizes[1] == 64 && partly::static_sizes[0] == dynamic);

using full = vf::shape_t<2, 16, 4, 8, 8>;
static_assert(full::is_static);
// A fully static shape's element count and strides are types, not values.
static_assert(decltype(full{}.numel())::value == 2 * 16 * 4 * 8 * 8);
static_assert(bare<decltype(hana::at_c<1>(vf::ncdhw_t::strides(full{})))>::value == 4 * 8 * 8);
static_assert(bare<decltype(hana::at_c<0>(vf::ndhwc_t::strides(full{})))>::value == 4 * 8 * 8 * 16);
static_assert(bare<decltype(hana::at_c<3>(vf::ndhwc_t::strides(full{})))>::value == 8 * 16);
// NDHWC with only C static: the W and C strides are static, the rest dynamic.
static_assert(vf::static_extent<bare<decltype(hana::at_c<4>(vf::ndhwc_t::strides(partly{})))>>);
static_assert(bare<decltype(hana::at_c<4>(vf::ndhwc_t::strides(partly{})))>::value == 64);
static_assert(std::is_same_v<bare<decltype(hana::at_c<3>(vf::ndhwc_t::strides(partly{})))>, index_t>);
// The channel form tells kernels how to vectorize, at compile time.
static_assert(decltype(vf::ndhwc_t::form(partly{}))::channel_minor);
static_assert(!decltype(vf::ncdhw_t::form(partly{}))::channel_minor);
static_assert(vf::offset<vf::ncdhw_t>(full{}, 1, 2, 3, 4, 5) == (((1 * 16 + 2) * 4 + 3) * 8 + 4) * 8 + 5);
static_assert(vf::offset<vf::ndhwc_t>(full{}, 1, 2, 3, 4, 5) == (((1 * 4 + 3) * 8 + 4) * 8 + 5) * 16 + 2);
// Static extents cost no storage.
static_assert(sizeof(vf::view_t<float, vf::ncdhw_t, full>) <= sizeof(float*) + 8);

TEST_CASE("views spell static and dynamic extents in one call", "[shape]")
{
    float buf[1];
    auto v = vf::ncdhw_view(buf, 2, vf::fix<64>, 3, 4, 5);
    STATIC_REQUIRE(std::is_same_v<decltype(v.shape().c()), vf::fixed_t<64>>);
    STATIC_REQUIRE(std::is_same_v<decltype(v.shape().n()), index_t>);
    REQUIRE(v.sizes() == sizes5{2, 64, 3, 4, 5});
    REQUIRE(v.numel() == 2 * 64 * 3 * 4 * 5);
    auto h = vf::ndhwc_view(buf, hana::int_c<1>, 3, hana::int_c<1>, 1, 1);
    STATIC_REQUIRE(std::is_same_v<decltype(h.shape().n()), vf::fixed_t<1>>);
    auto d = v.with_channels(index_t{64});
    STATIC_REQUIRE(std::is_same_v<decltype(d.shape().c()), index_t>);
    REQUIRE(v.layout_name() == "ncdhw");
    REQUIRE(h.layout_name() == "ndhwc");
}

TEST_CASE("layouts map logical (n,c,d,h,w) to PyTorch's memory order", "[shape]")
{
    const sizes5 s{2, 3, 4, 5, 6};
    std::vector<float> mem(static_cast<std::size_t>(numel(s)));
    auto a = view_of<vf::ncdhw_t>(mem.data(), s);
    auto b = view_of<vf::ndhwc_t>(mem.data(), s);
    for_each_index(s, [&](index_t n, index_t c, index_t d, index_t h, index_t w, index_t i) {
        // NCDHW is the logical order; NDHWC is torch's channels_last_3d strides (DHWC, HWC, WC, C, 1).
        REQUIRE(&a(n, c, d, h, w) - mem.data() == i);
        REQUIRE(&b(n, c, d, h, w) - mem.data() == n * 4 * 5 * 6 * 3 + c + d * 5 * 6 * 3 + h * 6 * 3 + w * 3);
    });
    auto f = b.form();
    REQUIRE(vf::value_of(f.outer) == 2 * 4 * 5 * 6);
    REQUIRE(vf::value_of(f.channels) == 3);
    REQUIRE(a.form().count() == 2 * 4 * 5 * 6);
}

TEST_CASE("views from run-time size lists check the rank like PyTorch", "[shape][errors]")
{
    float buf[1];
    const std::vector<index_t> four{1, 2, 3, 4};
    REQUIRE_THROWS_WITH(vf::ncdhw_view(buf, std::span<const index_t>(four)), "expected 5D input (got 4D input)");
    REQUIRE_THROWS_WITH(vf::ndhwc_view(buf, {1, 2, 3, 4, 5, 6}), "expected 5D input (got 6D input)");
    REQUIRE_THROWS_AS(vf::ncdhw_view(buf, {1, 2}), vf::error);
    auto v = vf::ncdhw_view(buf, {1, 1, 1, 1, 1});
    REQUIRE(v.numel() == 1);
}

TEST_CASE("negative extents and overflowing element counts are rejected", "[shape][errors]")
{
    float buf[1];
    REQUIRE_THROWS_WITH(vf::ncdhw_view(buf, 1, -1, 1, 1, 1),
                        "Trying to create tensor with negative dimension -1: [1, -1, 1, 1, 1]");
    const index_t big = index_t{1} << 40;
    REQUIRE_THROWS_WITH(vf::ndhwc_view(buf, big, big, 1, 1, 1),
                        "Storage size calculation overflowed with sizes=[1099511627776, 1099511627776, 1, 1, 1]");
    // Large but representable: fine (64-bit index arithmetic).
    auto v = vf::ncdhw_view(buf, index_t{1} << 20, 1 << 10, 1 << 10, 1, 1);
    REQUIRE(v.numel() == index_t{1} << 40);
    REQUIRE(&v((index_t{1} << 20) - 1, 0, 0, 0, 0) - buf == (index_t{1} << 40) - (1 << 20));
}

TEST_CASE("nCdhw16c: oneDNN's blocked offsets, padded storage, reorders between all layouts", "[shape][blocked]")
{
    const sizes5 s{2, 20, 2, 3, 4}; // C = 20: two blocks, the second 4/16 real
    const index_t S = 2 * 3 * 4;
    std::vector<float> mem(static_cast<std::size_t>(2 * 32 * S));
    auto b = view_of<vf::nCdhw16c_t>(mem.data(), s);
    REQUIRE(b.storage() == 2 * 32 * S);
    REQUIRE(b.numel() == 2 * 20 * S);
    for (const index_t N : {1, 3, 8})
        for (const index_t C : {1, 15, 16, 17, 32, 33, 64})
            REQUIRE(vf::nCdhw16c_view(mem.data(), N, C, 2, 3, 4).storage() == N * ((C + 15) / 16) * 16 * S);
    for_each_index(s, [&](index_t n, index_t c, index_t d, index_t h, index_t w, index_t) {
        REQUIRE(&b(n, c, d, h, w) - mem.data() == ((n * 2 + c / 16) * S + (d * 3 + h) * 4 + w) * 16 + c % 16);
    });
    // Round trips through every pair of layouts are exact; blocked padding is never written.
    std::mt19937 g(3);
    const auto logical = randn(numel(s), g);
    auto nc = to_layout<vf::ncdhw_t>(logical, s);
    std::vector<float> nd(nc.size()), bl(mem.size(), padding_sentinel), nc2(nc.size()), bl2(mem.size(), padding_sentinel);
    vf::reorder(view_of<vf::ncdhw_t>(nc.data(), s), view_of<vf::nCdhw16c_t>(bl.data(), s));
    vf::reorder(view_of<vf::nCdhw16c_t>(bl.data(), s).as_const(), view_of<vf::ndhwc_t>(nd.data(), s));
    vf::reorder(view_of<vf::ndhwc_t>(nd.data(), s), view_of<vf::nCdhw16c_t>(bl2.data(), s));
    vf::reorder(view_of<vf::nCdhw16c_t>(bl2.data(), s), view_of<vf::ncdhw_t>(nc2.data(), s));
    REQUIRE(same_bits(nc, nc2));
    REQUIRE(same_bits(bl, bl2));
    REQUIRE(same_bits(from_layout<vf::ndhwc_t>(nd, s), logical));
    for (index_t n = 0; n < 2; ++n)
        for (index_t i = 0; i < S; ++i)
            for (index_t l = 4; l < 16; ++l) REQUIRE(bl[static_cast<std::size_t>(((n * 2 + 1) * S + i) * 16 + l)] == padding_sentinel);
    REQUIRE_THROWS_WITH(vf::reorder(view_of<vf::ncdhw_t>(nc.data(), s), vf::ncdhw_view(nd.data(), 2, 20, 2, 4, 3)),
                        "reorder: destination has shape [2, 20, 2, 4, 3] but source has shape [2, 20, 2, 3, 4]");
    REQUIRE_THROWS_WITH(vf::reorder(view_of<vf::ncdhw_t>(nc.data(), s), view_of<vf::ndhwc_t>(nc.data() + 1, s)),
                        "reorder: source and destination overlap");
}

TEST_CASE("ncdhw <-> ndhwc reorders (tiled transposes) over several tiles, both ways and same-layout", "[shape][reorder]")
{
    std::mt19937 g(4);
    for (const sizes5 s : {sizes5{2, 37, 5, 7, 11}, sizes5{1, 1, 3, 1, 70}, sizes5{3, 64, 1, 1, 1}, sizes5{1, 33, 2, 4, 4}}) {
        INFO("shape " << vf::detail::sizes_str(s));
        const auto logical = randn(numel(s), g);
        auto nc = to_layout<vf::ncdhw_t>(logical, s), nd_want = to_layout<vf::ndhwc_t>(logical, s);
        std::vector<float> nd(nc.size(), NAN), nc2(nc.size(), NAN), copy(nc.size(), NAN);
        vf::reorder(view_of<vf::ncdhw_t>(nc.data(), s).as_const(), view_of<vf::ndhwc_t>(nd.data(), s));
        REQUIRE(same_bits(nd, nd_want));
        vf::reorder(view_of<vf::ndhwc_t>(nd.data(), s), view_of<vf::ncdhw_t>(nc2.data(), s));
        REQUIRE(same_bits(nc2, nc));
        vf::reorder(view_of<vf::ncdhw_t>(nc.data(), s), view_of<vf::ncdhw_t>(copy.data(), s));
        REQUIRE(same_bits(copy, nc));
    }
    // A view with a static channel count takes the same path.
    const sizes5 s{2, 16, 3, 4, 5};
    const auto logical = randn(numel(s), g);
    auto nc = to_layout<vf::ncdhw_t>(logical, s);
    std::vector<float> nd(nc.size());
    vf::reorder(vf::ncdhw_view(nc.data(), 2, vf::fix<16>, 3, 4, 5), vf::ndhwc_view(nd.data(), 2, vf::fix<16>, 3, 4, 5));
    REQUIRE(same_bits(nd, to_layout<vf::ndhwc_t>(logical, s)));
}
