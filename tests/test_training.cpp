// The pieces of a C++ training step around the conv blocks (issue 11, class 5): backward of
// MaxPool3d (PyTorch's tie rule), AdaptiveAvgPool3d and Linear, flatten in PyTorch's order for
// any layout, CrossEntropyLoss, parameters() and SGD.  Values marked "torch 1.13" were printed
// by PyTorch 1.13.1 for the same inputs; the rest is checked against float64 references here.
#include "support.hpp"

#include <cstdint>

using Catch::Matchers::Contains;
using Catch::Matchers::Equals;

namespace {

template <class L>
std::vector<float> maxpool_grad(const vf::MaxPool3d& mp, const std::vector<float>& x_logical, const sizes5& xs,
                                const std::vector<float>& dy_logical)
{
    const auto ys = mp.output_sizes(xs);
    auto x = to_layout<L>(x_logical, xs), dy = to_layout<L>(dy_logical, ys);
    std::vector<float> dx(x.size(), 42.f);
    mp.backward(view_of<L>(x.data(), xs), view_of<L>(dy.data(), ys), view_of<L>(dx.data(), xs));
    return from_layout<L>(dx, xs);
}

} // namespace

TEMPLATE_TEST_CASE("MaxPool3d backward sends each gradient where PyTorch does", "[training]", vf::ncdhw_t, vf::ndhwc_t)
{
    using L = TestType;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    // torch 1.13: ties go to the first element in (d, h, w) order, a NaN to the last NaN.
    REQUIRE(maxpool_grad<L>(vf::MaxPool3d(2), std::vector<float>(8, 0.f), {1, 1, 2, 2, 2}, {1.f}) ==
            std::vector<float>{1, 0, 0, 0, 0, 0, 0, 0});
    REQUIRE(maxpool_grad<L>(vf::MaxPool3d(2), {1, 3, 3, 2, 0, 3, 1, 1}, {1, 1, 2, 2, 2}, {1.f}) ==
            std::vector<float>{0, 1, 0, 0, 0, 0, 0, 0});
    REQUIRE(maxpool_grad<L>(vf::MaxPool3d(2), {1, nan, 3, nan, 0, 3, 1, 1}, {1, 1, 2, 2, 2}, {1.f}) ==
            std::vector<float>{0, 0, 0, 1, 0, 0, 0, 0});
    // torch 1.13: MaxPool3d(3, 2, 1) on zeros (a ReLU's output): each window's first in-image element.
    std::vector<float> want(27, 0.f);
    for (int i : {0, 1, 3, 4, 9, 10, 12, 13}) want[static_cast<std::size_t>(i)] = 1.f;
    REQUIRE(maxpool_grad<L>(vf::MaxPool3d(3, 2, 1), std::vector<float>(27, 0.f), {1, 1, 3, 3, 3},
                            std::vector<float>(8, 1.f)) == want);
    // Random data, overlapping windows, several channels: against a reference of the same rule.
    std::mt19937 g(7);
    const sizes5 xs{2, 3, 5, 4, 6};
    vf::MaxPool3d mp(3, 2, 1);
    const auto ys = mp.output_sizes(xs);
    auto x = randn(numel(xs), g);
    for (std::size_t i = 0; i < x.size(); i += 5) x[i] = 0.f; // some ties
    const auto dy = randn(numel(ys), g);
    std::vector<float> ref(x.size(), 0.f);
    for_each_index(ys, [&](index_t n, index_t c, index_t od, index_t oh, index_t ow, index_t yi) {
        float best = -std::numeric_limits<float>::infinity();
        index_t at = -1;
        for (index_t d = std::max<index_t>(0, od * 2 - 1); d < std::min<index_t>(xs[2], od * 2 + 2); ++d)
            for (index_t h = std::max<index_t>(0, oh * 2 - 1); h < std::min<index_t>(xs[3], oh * 2 + 2); ++h)
                for (index_t w = std::max<index_t>(0, ow * 2 - 1); w < std::min<index_t>(xs[4], ow * 2 + 2); ++w) {
                    const index_t xi = logical_index(xs, n, c, d, h, w);
                    if (at < 0 || x[xi] > best) best = x[xi], at = xi;
                }
        ref[static_cast<std::size_t>(at)] += dy[static_cast<std::size_t>(yi)];
    });
    REQUIRE(same_bits(maxpool_grad<L>(mp, x, xs, dy), ref)); // each sum has at most 8 terms, added in the same order
}

TEMPLATE_TEST_CASE("AdaptiveAvgPool3d backward spreads each gradient over its window", "[training]", vf::ncdhw_t,
                   vf::ndhwc_t)
{
    using L = TestType;
    std::mt19937 g(8);
    const sizes5 xs{2, 3, 5, 7, 4};
    vf::AdaptiveAvgPool3d ap({3, 2, 3}); // overlapping windows in d and w
    const auto ys = ap.output_sizes(xs);
    const auto dy_l = randn(numel(ys), g);
    auto dy = to_layout<L>(dy_l, ys);
    std::vector<float> dx(static_cast<std::size_t>(numel(xs)), 42.f);
    ap.backward(view_of<L>(dy.data(), ys), view_of<L>(dx.data(), xs));
    const auto got = from_layout<L>(dx, xs);
    std::vector<double> want(got.size(), 0.0), mag(got.size(), 0.0); // mag: the sum of |terms|
    auto lo = [](index_t i, index_t I, index_t O) { return i * I / O; };
    auto hi = [](index_t i, index_t I, index_t O) { return ((i + 1) * I + O - 1) / O; };
    for_each_index(ys, [&](index_t n, index_t c, index_t od, index_t oh, index_t ow, index_t yi) {
        const index_t d0 = lo(od, 5, 3), d1 = hi(od, 5, 3), h0 = lo(oh, 7, 2), h1 = hi(oh, 7, 2), w0 = lo(ow, 4, 3),
                      w1 = hi(ow, 4, 3);
        const double share = dy_l[static_cast<std::size_t>(yi)] / static_cast<double>((d1 - d0) * (h1 - h0) * (w1 - w0));
        for (index_t d = d0; d < d1; ++d)
            for (index_t h = h0; h < h1; ++h)
                for (index_t w = w0; w < w1; ++w) {
                    const auto i = static_cast<std::size_t>(logical_index(xs, n, c, d, h, w));
                    want[i] += share;
                    mag[i] += std::abs(share);
                }
    });
    // Each element sums at most 8 shares in float (each share one division): (8 + 2) roundings of the terms.
    for (std::size_t i = 0; i < got.size(); ++i) CHECK_NEAR(got[i], want[i], 10 * eps_f * mag[i]);
}

TEST_CASE("Linear backward: grad input, accumulated weight and bias grads", "[training]")
{
    std::mt19937 g(9);
    const index_t N = 3, I = 7, O = 4;
    vf::Linear lin(I, O);
    const auto x = randn(N * I, g), dy = randn(N * O, g);
    std::vector<float> dx(static_cast<std::size_t>(N * I));
    lin.backward(x, dy, dx, N);
    lin.backward(x, dy, {}, N); // a first layer: no grad input; the grads accumulate again
    const auto w = lin.weight();
    for (index_t n = 0; n < N; ++n)
        for (index_t i = 0; i < I; ++i) {
            double s = 0, m = 0;
            for (index_t o = 0; o < O; ++o) s += double(dy[n * O + o]) * w[o * I + i], m += std::abs(double(dy[n * O + o]) * w[o * I + i]);
            CHECK_NEAR(dx[n * I + i], s, (O + 2) * eps_f * m);
        }
    for (index_t o = 0; o < O; ++o) {
        double b = 0, mb = 0;
        for (index_t n = 0; n < N; ++n) b += dy[n * O + o], mb += std::abs(dy[n * O + o]);
        CHECK_NEAR(lin.bias_grad()[o], 2 * b, 2 * (N + 2) * eps_f * mb);
        for (index_t i = 0; i < I; ++i) {
            double s = 0, m = 0;
            for (index_t n = 0; n < N; ++n) s += double(dy[n * O + o]) * x[n * I + i], m += std::abs(double(dy[n * O + o]) * x[n * I + i]);
            CHECK_NEAR(lin.weight_grad()[o * I + i], 2 * s, 2 * (N + 2) * eps_f * m);
        }
    }
    const auto before = vec(lin.weight_grad());
    CHECK_THROWS_WITH(lin.backward(x, dy, std::span<float>(dx.data(), 5), N), Contains("grad_input has 5 elements"));
    CHECK_THROWS_WITH(lin.backward(x, dy, std::span<float>(const_cast<float*>(dy.data()), dx.size()), N),
                      Contains("grad_input overlaps grad_output"));
    CHECK(same_bits(vec(lin.weight_grad()), before));
    lin.zero_grad();
    CHECK(vec(lin.weight_grad()) == std::vector<float>(static_cast<std::size_t>(I * O), 0.f));
}

TEST_CASE("flatten follows torch.flatten's order whatever the layout, and unflatten inverts it", "[training]")
{
    std::mt19937 g(10);
    const sizes5 s{2, 3, 2, 3, 4};
    const auto logical = randn(numel(s), g);
    auto nd = to_layout<vf::ndhwc_t>(logical, s);
    auto nc = to_layout<vf::ncdhw_t>(logical, s);
    std::vector<float> a(logical.size()), b(logical.size());
    vf::flatten(view_of<vf::ndhwc_t>(nd.data(), s), a);
    vf::flatten(view_of<vf::ncdhw_t>(nc.data(), s), b);
    REQUIRE(a == logical); // NCDHW order: what Linear after torch.flatten(x, 1) expects
    REQUIRE(b == logical);
    std::vector<float> back(logical.size());
    vf::unflatten(a, view_of<vf::ndhwc_t>(back.data(), s));
    REQUIRE(back == nd);
    CHECK_THROWS_WITH(vf::flatten(view_of<vf::ncdhw_t>(nc.data(), s), std::span<float>(a.data(), 3)),
                      Contains("output has 3 elements"));
}

TEST_CASE("CrossEntropyLoss: PyTorch's loss, gradient, ignore_index and messages", "[training]")
{
    vf::CrossEntropyLoss ce;
    const std::vector<float> z{1.f, 2.f, 3.f, 0.5f, -1.f, 2.f};
    // torch 1.13: cross_entropy([[1,2,3],[0.5,-1,2]], [2,-100]) = 0.40760594606399536, grad below.
    const float loss = ce.forward(z, std::vector<std::int64_t>{2, -100}, 2, 3);
    CHECK_NEAR(loss, 0.40760594606399536, 1e-6);
    std::vector<float> dz(6);
    ce.backward(dz);
    const std::vector<double> want{0.09003058075904846, 0.24472849071025848, -0.334758996963501, 0, 0, 0};
    for (std::size_t i = 0; i < 6; ++i) CHECK_NEAR(dz[i], want[i], 1e-6);
    // Both rows counted: the mean of the two rows' losses, in float64 here.
    const float l2 = ce.forward(z, std::vector<std::int64_t>{0, 2}, 2, 3);
    auto row = [&](int n, int t) {
        double m = 0, s = 0;
        for (int k = 0; k < 3; ++k) m = std::max<double>(m, z[n * 3 + k]);
        for (int k = 0; k < 3; ++k) s += std::exp(z[n * 3 + k] - m);
        return -(z[n * 3 + t] - m - std::log(s));
    };
    CHECK_NEAR(l2, (row(0, 0) + row(1, 2)) / 2, 1e-6);
    CHECK_THROWS_WITH(ce.forward(z, std::vector<std::int64_t>{0, 3}, 2, 3), Equals("Target 3 is out of bounds."));
    CHECK_THROWS_WITH(ce.forward(z, std::vector<std::int64_t>{0, -1}, 2, 3), Equals("Target -1 is out of bounds."));
    CHECK_THROWS_WITH(ce.forward(z, std::vector<std::int64_t>{0, 1, 1}, 2, 3),
                      Equals("Expected input batch_size (2) to match target batch_size (3)."));
}

TEST_CASE("SGD follows torch.optim.SGD (momentum, dampening, weight decay, nesterov)", "[training]")
{
    for (const bool nesterov : {false, true}) {
        const double lr = 0.1, mom = 0.9, damp = nesterov ? 0.0 : 0.1, wd = 0.01;
        vf::Linear lin(3, 2);
        auto params = lin.parameters();
        REQUIRE(params.size() == 2);
        REQUIRE(params[0].name == "weight");
        std::vector<double> p(params[0].value.begin(), params[0].value.end()), buf(p.size(), 0.0);
        vf::SGD opt(lin.parameters(), lr, mom, damp, wd, nesterov);
        std::mt19937 g(11);
        for (int step = 0; step < 3; ++step) {
            opt.zero_grad();
            const auto x = randn(3, g), dy = randn(2, g);
            lin.backward(x, dy, {}, 1);
            const auto grad = vec(lin.weight_grad());
            opt.step();
            // PyTorch's formula, in double.
            for (std::size_t i = 0; i < p.size(); ++i) {
                double d = grad[i] + wd * p[i];
                buf[i] = step == 0 ? d : mom * buf[i] + (1 - damp) * d;
                d = nesterov ? d + mom * buf[i] : buf[i];
                p[i] -= lr * d;
                CHECK_NEAR(lin.weight()[i], p[i], 1e-6);
            }
        }
    }
    vf::Linear lin(2, 2);
    CHECK_THROWS_WITH(vf::SGD(lin.parameters(), -1.0), Contains("Invalid learning rate"));
    CHECK_THROWS_WITH(vf::SGD(lin.parameters(), 0.1, 0.0, 0.0, 0.0, true), Contains("Nesterov momentum requires"));
}

TEST_CASE("parameters() names what PyTorch's state_dict names", "[training]")
{
    vf::ConvBnReLU3d<> block(vf::Conv3d<>(2, 4, 3), vf::BatchNorm3d<>(4));
    std::vector<std::string> names;
    for (const auto& p : block.parameters()) names.push_back(p.name);
    REQUIRE(names == std::vector<std::string>{"0.weight", "0.bias", "1.weight", "1.bias"});
    REQUIRE(vf::BatchNorm3d<>(4, 1e-5, 0.1, false).parameters().empty());
    REQUIRE(vf::Conv3d<>(2, 4, 3, 1, 0, 1, 1, false).parameters().size() == 1);
}
