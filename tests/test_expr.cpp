// The expression form: vf::evaluate(Y, expr) runs the same kernels as the module API,
// and vf::describe prints the loop nest it compiles to.
#include "support.hpp"

namespace {

template <class L, class BN>
void same_as_forward(BN& a, BN& b, const sizes5& s, bool relu)
{
    std::mt19937 g(41);
    const auto x = to_layout<L>(randn(numel(s), g, 1.0, 2.0), s);
    std::vector<float> y1(x.size()), y2(x.size());
    auto X = view_of<L>(const_cast<float*>(x.data()), s);
    if (relu) {
        a.forward(X, view_of<L>(y1.data(), s), vf::relu);
        vf::evaluate(view_of<L>(y2.data(), s), vf::relu(b(X)));
    } else {
        a.forward(X, view_of<L>(y1.data(), s));
        vf::evaluate(view_of<L>(y2.data(), s), b(X));
    }
    REQUIRE(same_bits(y1, y2));
    REQUIRE(same_bits(vec(a.running_mean()), vec(b.running_mean())));
    REQUIRE(same_bits(vec(a.running_var()), vec(b.running_var())));
    REQUIRE(a.num_batches_tracked() == b.num_batches_tracked());
}

} // namespace

TEST_CASE("evaluate(Y, relu(bn(X))) is bn.forward(X, Y, relu)", "[expr]")
{
    const sizes5 s{2, 16, 3, 5, 7};
    for (const bool relu : {false, true})
        for (const bool train : {true, false}) {
            vf::BatchNorm3d<16> a(16), b(16);
            vf::BatchNorm3d<> c(16), d(16);
            for (auto* m : {&c, &d}) m->train(train);
            a.train(train);
            b.train(train);
            same_as_forward<vf::ncdhw_t>(a, b, s, relu);
            same_as_forward<vf::ndhwc_t>(a, b, s, relu);
            same_as_forward<vf::ncdhw_t>(c, d, s, relu);
            same_as_forward<vf::ndhwc_t>(c, d, s, relu);
            same_as_forward<vf::nCdhw16c_t>(a, b, s, relu);
            same_as_forward<vf::nCdhw16c_t>(c, d, s, relu);
        }
}

TEST_CASE("channel_affine and a bare epilogue", "[expr]")
{
    const sizes5 s{2, 5, 2, 3, 7};
    std::mt19937 g(43);
    const auto x = randn(numel(s), g);
    const std::vector<float> scale{0.5f, -2.f, 1.f, 3.f, 0.f}, shift{1.f, 0.25f, -1.f, 0.f, -0.5f};
    for (const bool ndhwc : {false, true}) {
        auto run = [&](auto layout) {
            using L = decltype(layout);
            auto xm = to_layout<L>(x, s);
            std::vector<float> y(xm.size()), r(xm.size());
            auto X = view_of<L>(xm.data(), s);
            vf::evaluate(view_of<L>(y.data(), s), vf::relu(vf::channel_affine(X, scale, shift)));
            vf::evaluate(view_of<L>(r.data(), s), vf::relu(X));
            const auto yl = from_layout<L>(y, s), rl = from_layout<L>(r, s);
            for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
                const double ref = static_cast<double>(x[i]) * scale[c] + shift[c];
                CHECK_NEAR(yl[i], ref < 0 ? 0.0 : ref, 2 * eps_f * (std::abs(x[i] * scale[c]) + std::abs(shift[c])));
                REQUIRE(same_bits(rl[i], x[i] < 0 ? 0.f : x[i]));
            });
            std::vector<float> bad{1.f};
            REQUIRE_THROWS_WITH(vf::evaluate(view_of<L>(y.data(), s), vf::channel_affine(X, bad, shift)),
                                "channel_affine: scale and shift should contain 5 elements not 1 and 5");
        };
        if (ndhwc) run(vf::ndhwc_t{});
        else run(vf::ncdhw_t{});
    }
}

TEST_CASE("describe prints the loop nest the layout and static extents select", "[expr][schedule]")
{
    std::vector<float> buf(2 * 64 * 4 * 4 * 4);
    vf::BatchNorm3d<64> bn(64);
    auto N = vf::ncdhw_view(buf.data(), 2, 64, 4, 4, 4);
    auto H = vf::ndhwc_view(buf.data(), 2, vf::fix<64>, 4, 4, 4);
    const std::string a = vf::describe(N, vf::relu(bn(N)));
    INFO(a);
    // A BatchNorm3d<64> specializes the dynamic-C view: the kernels see a static C.
    CHECK(a.find("evaluate: relu(batch_norm[batch statistics]) -> ncdhw [2, 64, 4, 4, 4], C = 64 (static)") == 0);
    vf::BatchNorm3d<> dyn(64);
    CHECK(vf::describe(N, dyn(N)).find("C = 64 (dynamic)") != std::string::npos);
    CHECK(a.find("parallel for c in [0, C)") != std::string::npos);
    CHECK(a.find("channel block 1") != std::string::npos);
    const std::string b = vf::describe(H, vf::relu(bn(H)));
    INFO(b);
    CHECK(b.find("C = 64 (static)") != std::string::npos);
    // Unrolled (accumulators in registers) when C fits in max_unrolled_channel_vectors vectors:
    // 4 AVX-512 or 8 AVX2 vectors yes, 16 SSE2 vectors no.
    const bool unrolled = 64 / vf::simd::width <= vf::kernels::max_unrolled_channel_vectors;
    CHECK((b.find("unrolled at compile time") != std::string::npos) == unrolled);
    CHECK(b.find("block partials added in block order") != std::string::npos);
    bn.eval();
    const std::string c = vf::describe(H, bn(H));
    CHECK(c.find("running statistics") != std::string::npos);
    CHECK(c.find("var_sum") == std::string::npos);
    const auto sched = vf::schedule_for(H.form());
    CHECK(sched.vector_width == vf::simd::width);
    CHECK(sched.channel_block == 64);
    CHECK(sched.channels_unrolled == (64 / vf::simd::width <= vf::kernels::max_unrolled_channel_vectors));
}

TEST_CASE("describe prints the conv loop nest: plain, fused training, folded inference", "[expr][conv]")
{
    std::vector<float> x(2 * 8 * 4 * 4 * 4), y(2 * 16 * 4 * 4 * 4);
    auto X = vf::ndhwc_view(x.data(), 2, 8, 4, 4, 4);
    auto Y = vf::ndhwc_view(y.data(), 2, 16, 4, 4, 4);
    vf::Conv3d<vf::conv_spec{.in = 8, .out = 16, .kernel = 3, .stride = 1, .padding = 1}> conv;
    vf::BatchNorm3d<> bn(16);
    const std::string plain = vf::describe(Y, conv(X));
    CHECK(plain.find("evaluate: identity(conv3d) -> ndhwc [2, 16, 4, 4, 4], Conv3d(8, 16, kernel_size=(3, 3, 3)") == 0);
    CHECK(plain.find("(spec: static where fixed)") != std::string::npos);
    CHECK(plain.find("y = identity(acc + bias); store y   # written once") != std::string::npos);
    const std::string train = vf::describe(Y, vf::relu(bn(conv(X))));
    CHECK(train.find("relu(batch_norm[batch statistics](conv3d))") != std::string::npos);
    CHECK(train.find("block sums of (z - K) and (z - K)^2 in double") != std::string::npos);
    CHECK(train.find("merge block moments in block order (Chan)") != std::string::npos);
    bn.eval();
    const std::string eval = vf::describe(Y, vf::relu(bn(conv(X))));
    CHECK(eval.find("fold batch_norm into the packed weights and bias") != std::string::npos);
    CHECK(eval.find("y = relu(acc + bias); store y   # written once") != std::string::npos);
}
