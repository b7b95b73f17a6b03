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
