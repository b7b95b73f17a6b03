// The registry and the generated kernels (tests/registry_test.arch, generated at build time
// by gen/volfuse_gen): lookups, specialized == runtime-shaped fallback bit for bit on every
// registered layer, unregistered shapes fall back, concurrent queries.
#include <atomic>
#include <thread>

#include "registry_test.hpp"
#include "support.hpp"

using vf::registry::op;

TEST_CASE("generated layers are found; other shapes fall back, and the choice says why", "[registry]")
{
    auto& r = vf::registry::global();
    const vf::registry::key a{op::conv_bn_relu, 5, 17, 3, 1, 1, 1, "ndhwc"};
    const auto found = r.lookup(a);
    REQUIRE(found.specialized);
    REQUIRE(found.why == "specialized: generated for registry_test.arch:2 (block_a)");
    const auto b = r.lookup({op::conv, 8, 24, {1, 3, 3}, {1, 2, 1}, {0, 1, 1}, 1, "ncdhw"});
    REQUIRE(b.specialized);
    REQUIRE(b.why == "specialized: generated for registry_test.arch:3 (conv_b)");
    // Same layer, other layout / op / padding: the runtime-shaped fallback.
    for (const vf::registry::key& k :
         {vf::registry::key{op::conv_bn_relu, 5, 17, 3, 1, 1, 1, "ncdhw"}, vf::registry::key{op::conv, 5, 17, 3, 1, 1, 1, "ndhwc"},
          vf::registry::key{op::conv_bn_relu, 5, 17, 3, 1, 0, 1, "ndhwc"}}) {
        const auto c = r.lookup(k);
        REQUIRE_FALSE(c.specialized);
        REQUIRE(c.kernels != nullptr);
        REQUIRE(c.why == "runtime-shaped fallback: no generated kernel for " + k.str());
    }
    // Registering again (a second register_kernels call) changes nothing.
    const auto before = r.size();
    registry_test::register_kernels();
    REQUIRE(r.size() == before);
    REQUIRE(r.lookup(a).kernels == found.kernels);
}

TEST_CASE("a runtime-shaped block runs the generated kernels, with the fallback's bits", "[registry]")
{
    std::mt19937 g(41);
    const sizes5 xs{2, 5, 4, 6, 7}, ys{2, 17, 4, 6, 7};
    const auto x = randn(numel(xs), g), dy = randn(numel(ys), g);
    auto run = [&](auto layout, bool train) {
        using L = decltype(layout);
        vf::ConvBnReLU3d<> block(vf::Conv3d<>(5, 17, 3, 1, 1), vf::BatchNorm3d<>(17));
        block.train(train);
        auto xm = to_layout<L>(x, xs), dym = to_layout<L>(dy, ys);
        std::vector<float> ym(numel(ys)), dxm(numel(xs));
        block.forward(view_of<L>(xm.data(), xs), view_of<L>(ym.data(), ys));
        block.backward(view_of<L>(xm.data(), xs), view_of<L>(dym.data(), ys), view_of<L>(dxm.data(), xs));
        struct out {
            std::vector<float> y, dx, gw, gamma_grad;
            vf::registry::choice choice;
        };
        if constexpr (std::is_same_v<L, vf::ndhwc_t>) {
            // The block's BatchNorm3d ran the BN kernels generated with the block (normalize in
            // training, backward in both modes); inference folds it into the conv.
            const std::string why = block.bn().kernel_choice().why;
            REQUIRE(why == "specialized: generated with its block, registry_test.arch:2 (block_a)");
            REQUIRE(block.bn().kernel_choice(vf::ndhwc, true).why == why);
        }
        return out{from_layout<L>(ym, ys), from_layout<L>(dxm, xs), vec(block.conv().weight_grad()),
                   vec(block.bn().weight_grad()), block.conv().kernel_choice()};
    };
    for (const bool train : {true, false}) {
        const auto special = run(vf::ndhwc_t{}, train); // registered layout
        const auto fallback = run(vf::ncdhw_t{}, train); // not registered: runtime-shaped kernels
        REQUIRE(special.choice.specialized);
        REQUIRE_FALSE(fallback.choice.specialized);
        REQUIRE(same_bits(special.y, fallback.y));
        REQUIRE(same_bits(special.dx, fallback.dx));
        REQUIRE(same_bits(special.gw, fallback.gw));
        REQUIRE(same_bits(special.gamma_grad, fallback.gamma_grad));
    }
}

TEST_CASE("a runtime-shaped Conv3d runs the generated conv, with the fallback's bits", "[registry]")
{
    std::mt19937 g(42);
    const sizes5 xs{2, 8, 3, 9, 10};
    vf::Conv3d<> probe(8, 24, {1, 3, 3}, {1, 2, 1}, {0, 1, 1});
    const sizes5 ys = probe.output_sizes(xs);
    const auto x = randn(numel(xs), g), dy = randn(numel(ys), g);
    auto run = [&](auto layout) {
        using L = decltype(layout);
        vf::Conv3d<> conv(8, 24, {1, 3, 3}, {1, 2, 1}, {0, 1, 1});
        auto xm = to_layout<L>(x, xs), dym = to_layout<L>(dy, ys);
        std::vector<float> ym(numel(ys)), dxm(numel(xs));
        conv.forward(view_of<L>(xm.data(), xs), view_of<L>(ym.data(), ys));
        const bool fwd_specialized = conv.kernel_choice().specialized;
        conv.backward(view_of<L>(xm.data(), xs), view_of<L>(dym.data(), ys), view_of<L>(dxm.data(), xs));
        REQUIRE(conv.kernel_choice().specialized == fwd_specialized);
        return std::tuple{from_layout<L>(ym, ys), from_layout<L>(dxm, xs), vec(conv.weight_grad()), fwd_specialized};
    };
    const auto [y1, dx1, gw1, s1] = run(vf::ncdhw_t{}); // registered layout
    const auto [y2, dx2, gw2, s2] = run(vf::ndhwc_t{});
    REQUIRE(s1);
    REQUIRE_FALSE(s2);
    REQUIRE(same_bits(y1, y2));
    REQUIRE(same_bits(dx1, dx2));
    REQUIRE(same_bits(gw1, gw2));
}

TEST_CASE("the registry answers queries from several threads while entries are added", "[registry][parallel]")
{
    vf::registry::table t;
    const vf::registry::key hit{op::conv, 3, 4, 3, 1, 1, 1, "ndhwc"};
    t.add(hit, {vf::registry::conv_kernels_for<vf::conv_spec{}>(), "test"});
    std::atomic<bool> wrong{false};
    std::vector<std::thread> readers;
    for (int i = 0; i < 4; ++i)
        readers.emplace_back([&, i] {
            for (int k = 0; k < 2000; ++k) {
                const auto c = t.lookup(hit);
                const auto miss = t.lookup({op::conv, 1000 + i, 1, 1, 1, 0, 1, "ndhwc"});
                if (!c.specialized || c.why != "specialized: generated for test" || miss.specialized) wrong = true;
            }
        });
    std::thread writer([&] {
        for (int k = 0; k < 500; ++k) t.add({op::conv, 10 + k, 8, 3, 1, 1, 1, "ncdhw"}, {{}, "w"});
    });
    writer.join();
    for (auto& r : readers) r.join();
    REQUIRE_FALSE(wrong);
    REQUIRE(t.size() == 501);
}

TEST_CASE("a runtime-shaped BatchNorm3d runs the generated kernels, with the fallback's bits", "[registry][bn]")
{
    std::mt19937 g(43);
    const sizes5 s{2, 24, 3, 5, 7};
    const auto x = randn(numel(s), g, 0.5, 2.0), dy = randn(numel(s), g);
    auto run = [&](bool registry_on, bool train, bool relu) {
        vf::registry::global().set_enabled(registry_on);
        vf::BatchNorm3d<> bn(24);
        bn.train(train);
        auto xm = to_layout<vf::ncdhw_t>(x, s), dym = to_layout<vf::ncdhw_t>(dy, s);
        std::vector<float> y(x.size()), dx(x.size());
        auto X = view_of<vf::ncdhw_t>(xm.data(), s);
        if (relu) bn.forward(X, view_of<vf::ncdhw_t>(y.data(), s), vf::relu);
        else bn.forward(X, view_of<vf::ncdhw_t>(y.data(), s));
        const bool fwd_specialized = bn.kernel_choice().found != nullptr;
        if (relu) bn.backward(X, view_of<vf::ncdhw_t>(dym.data(), s), view_of<vf::ncdhw_t>(dx.data(), s), vf::relu);
        else bn.backward(X, view_of<vf::ncdhw_t>(dym.data(), s), view_of<vf::ncdhw_t>(dx.data(), s));
        vf::registry::global().set_enabled(true);
        return std::tuple{y, dx, vec(bn.weight_grad()), vec(bn.running_var()), fwd_specialized, bn.kernel_choice().why};
    };
    for (const bool train : {true, false}) {
        const auto [y1, dx1, gw1, rv1, s1, why1] = run(true, train, false);
        const auto [y2, dx2, gw2, rv2, s2, why2] = run(false, train, false);
        REQUIRE(s1);
        REQUIRE(why1 == "specialized: generated for registry_test.arch:4 (bn_c)");
        REQUIRE_FALSE(s2);
        REQUIRE(same_bits(y1, y2));
        REQUIRE(same_bits(dx1, dx2));
        REQUIRE(same_bits(gw1, gw2));
        REQUIRE(same_bits(rv1, rv2));
        // The .arch registered batch_norm, not bn_relu: with ReLU the lookup misses.
        const auto [y3, dx3, gw3, rv3, s3, why3] = run(true, train, true);
        REQUIRE_FALSE(s3);
        REQUIRE(why3.find("runtime-shaped fallback: no generated kernel for bn_relu in=24") == 0);
    }
}

TEST_CASE("the registry can be switched off, for comparing kernels", "[registry]")
{
    auto& r = vf::registry::global();
    const vf::registry::key a{op::conv_bn_relu, 5, 17, 3, 1, 1, 1, "ndhwc"};
    r.set_enabled(false);
    const auto off = r.lookup(a);
    r.set_enabled(true);
    REQUIRE_FALSE(off.specialized);
    REQUIRE(off.why == "runtime-shaped fallback: registry disabled (set_enabled(false))");
    REQUIRE(r.lookup(a).specialized);
}

TEST_CASE("a block's BatchNorm3d reports what ran: its block's generated kernels, or folded", "[registry]")
{
    std::mt19937 g(43);
    const sizes5 xs{1, 5, 3, 4, 5}, ys{1, 17, 3, 4, 5};
    auto x = randn(numel(xs), g);
    std::vector<float> y(static_cast<std::size_t>(numel(ys)));
    vf::ConvBnReLU3d<> block(vf::Conv3d<>(5, 17, 3, 1, 1), vf::BatchNorm3d<>(17));
    REQUIRE(block.bn().kernel_choice().why.rfind("no call yet", 0) == 0);
    block.eval();
    block.forward(view_of<vf::ndhwc_t>(x.data(), xs), view_of<vf::ndhwc_t>(y.data(), ys));
    REQUIRE(block.bn().kernel_choice().why ==
            "folded into the conv's weights and bias (inference); the conv: specialized: generated for "
            "registry_test.arch:2 (block_a)");
    block.train();
    block.forward(view_of<vf::ndhwc_t>(x.data(), xs), view_of<vf::ndhwc_t>(y.data(), ys));
    REQUIRE(block.bn().kernel_choice().why == "specialized: generated with its block, registry_test.arch:2 (block_a)");
    // The same BatchNorm3d used alone afterwards looks itself up again (no standalone kernels
    // for 17 channels were generated).
    vf::BatchNorm3d<> alone = block.bn();
    std::vector<float> z(y.size());
    alone.forward(view_of<vf::ndhwc_t>(y.data(), ys), view_of<vf::ndhwc_t>(z.data(), ys));
    REQUIRE(alone.kernel_choice().why.rfind("runtime-shaped fallback: no generated kernel for batch_norm in=17", 0) == 0);
}

TEST_CASE("the generated block type is specialized whole: conv and BatchNorm3d, same bits", "[registry]")
{
    static_assert(registry_test::block_a_t::bn_type::static_channels == 17);
    std::mt19937 g(44);
    const sizes5 xs{2, 5, 3, 4, 6}, ys{2, 17, 3, 4, 6};
    const auto x = randn(numel(xs), g), dy = randn(numel(ys), g);
    auto run = [&](auto& block) {
        std::vector<float> y(static_cast<std::size_t>(numel(ys))), dx(x.size());
        auto xm = x, dym = dy;
        block.forward(view_of<vf::ndhwc_t>(xm.data(), xs), view_of<vf::ndhwc_t>(y.data(), ys));
        block.backward(view_of<vf::ndhwc_t>(xm.data(), xs), view_of<vf::ndhwc_t>(dym.data(), ys),
                       view_of<vf::ndhwc_t>(dx.data(), xs));
        return std::tuple{y, dx, vec(block.conv().weight_grad()), vec(block.bn().weight_grad()),
                          vec(block.bn().running_var())};
    };
    registry_test::block_a_t named;
    vf::ConvBnReLU3d<> runtime(vf::Conv3d<>(5, 17, 3, 1, 1), vf::BatchNorm3d<>(17));
    const auto a = run(named), b = run(runtime);
    REQUIRE(named.bn().kernel_choice().why == "specialized: compile-time channel count");
    REQUIRE(same_bits(std::get<0>(a), std::get<0>(b)));
    REQUIRE(same_bits(std::get<1>(a), std::get<1>(b)));
    REQUIRE(same_bits(std::get<2>(a), std::get<2>(b)));
    REQUIRE(same_bits(std::get<3>(a), std::get<3>(b)));
    REQUIRE(same_bits(std::get<4>(a), std::get<4>(b)));
}
