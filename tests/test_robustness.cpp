// Bad input never crashes, never corrupts, never half-applies (issue 11, class 1): one test
// per class of bad argument, each over every public entry point it applies to.  Each failing
// call must throw vf::error, leave its outputs byte-identical and the module's state as it was.
#include "support.hpp"

#include <cstring>
#include <limits>

using Catch::Matchers::Contains;
using Catch::Matchers::Equals;

namespace {

const sizes5 S{2, 4, 4, 4, 4};

std::vector<float> ramp(index_t n, float scale = 0.37f)
{
    std::vector<float> v(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = std::sin(scale * static_cast<float>(i)) * 3.f;
    return v;
}

auto nc(float* p, const sizes5& s) { return view_of<vf::ncdhw_t>(p, s); }
auto nd(float* p, const sizes5& s) { return view_of<vf::ndhwc_t>(p, s); }

/// Everything observable of a BatchNorm3d (parameters, buffers, grads, counter) as bytes.
template <class BN>
std::vector<float> bn_state(const BN& bn)
{
    std::vector<float> s;
    for (auto sp : {bn.weight(), bn.bias(), bn.running_mean(), bn.running_var(), bn.weight_grad(), bn.bias_grad()})
        s.insert(s.end(), sp.begin(), sp.end());
    s.push_back(static_cast<float>(bn.num_batches_tracked()));
    return s;
}
template <class Conv>
std::vector<float> conv_state(const Conv& c)
{
    std::vector<float> s;
    for (auto sp : {c.weight(), c.bias(), c.weight_grad(), c.bias_grad()}) s.insert(s.end(), sp.begin(), sp.end());
    return s;
}
bool same_bytes(const std::vector<float>& a, const std::vector<float>& b)
{
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

} // namespace

TEST_CASE("null data is an error at every entry point, with nothing written", "[robustness]")
{
    auto x = ramp(numel(S)), y = ramp(numel(S), 0.11f), dy = ramp(numel(S), 0.5f);
    const auto y0 = y;
    float* null = nullptr;
    const sizes5 pooled{2, 4, 2, 2, 2};
    auto expect_null = [&](auto f, const char* what) {
        CHECK_THROWS_WITH(f(), Contains(what) && Contains("data pointer is null"));
        CHECK(same_bytes(y, y0));
    };
    vf::MaxPool3d mp(2);
    expect_null([&] { mp.forward(nc(null, S), nc(y.data(), pooled)); }, "input");
    expect_null([&] { mp.forward(nc(x.data(), S), nc(null, pooled)); }, "output");
    vf::AdaptiveAvgPool3d ap(2);
    expect_null([&] { ap.forward(nc(null, S), nc(y.data(), pooled)); }, "input");
    expect_null([&] { ap.forward(nc(x.data(), S), nc(null, pooled)); }, "output");
    expect_null([&] { vf::reorder(nc(x.data(), S), nd(null, S)); }, "destination");
    expect_null([&] { vf::reorder(nc(null, S), nd(y.data(), S)); }, "source");
    expect_null([&] { vf::evaluate(nc(null, S), vf::relu(nc(x.data(), S))); }, "output");
    expect_null([&] { vf::evaluate(nc(y.data(), S), vf::relu(nc(null, S))); }, "input");

    vf::BatchNorm3d<> bn(4);
    const auto bn0 = bn_state(bn);
    expect_null([&] { bn.forward(nc(null, S), nc(y.data(), S)); }, "input");
    expect_null([&] { bn.forward(nc(x.data(), S), nc(null, S)); }, "output");
    CHECK(same_bytes(bn_state(bn), bn0));
    bn.forward(nc(x.data(), S), nc(y.data(), S));
    const auto y1 = y;
    const auto bn1 = bn_state(bn);
    CHECK_THROWS_WITH(bn.backward(nc(x.data(), S), nc(null, S), nc(y.data(), S)), Contains("grad_output data pointer is null"));
    CHECK_THROWS_WITH(bn.backward(nc(x.data(), S), nc(dy.data(), S), nc(null, S)), Contains("grad_input data pointer is null"));
    CHECK(same_bytes(bn_state(bn), bn1));
    CHECK(same_bytes(y, y1));

    vf::Conv3d<> conv(4, 4, 3, 1, 1);
    const auto c0 = conv_state(conv);
    CHECK_THROWS_WITH(conv.forward(nc(null, S), nc(y.data(), S)), Contains("input data pointer is null"));
    CHECK_THROWS_WITH(conv.forward(nc(x.data(), S), nc(null, S)), Contains("output data pointer is null"));
    CHECK_THROWS_WITH(conv.backward(nc(x.data(), S), nc(null, S), nc(y.data(), S)), Contains("grad_output data pointer is null"));
    CHECK_THROWS_WITH(conv.backward(nc(x.data(), S), nc(dy.data(), S), nc(null, S)), Contains("grad_input data pointer is null"));
    CHECK_THROWS_WITH(conv.backward_input(nc(null, S), nc(y.data(), S)), Contains("grad_output data pointer is null"));
    CHECK_THROWS_WITH(conv.backward_weight(nc(x.data(), S), nc(null, S)), Contains("grad_output data pointer is null"));
    CHECK(same_bytes(conv_state(conv), c0));
    CHECK(same_bytes(y, y1));
}

TEST_CASE("the fused block validates its whole backward before any part writes (both layouts)", "[robustness]")
{
    auto run = [](auto view) {
        auto x = ramp(numel(S)), y = ramp(numel(S)), dy = ramp(numel(S), 0.5f), dx = ramp(numel(S), 0.2f);
        vf::ConvBnReLU3d<> block(vf::Conv3d<>(4, 4, 3, 1, 1), vf::BatchNorm3d<>(4));
        block.forward(view(x.data(), S), view(y.data(), S));
        const auto bn0 = bn_state(block.bn());
        const auto c0 = conv_state(block.conv());
        const auto dx0 = dx;
        float* null = nullptr;
        CHECK_THROWS_WITH(block.backward(view(x.data(), S), view(null, S), view(dx.data(), S)),
                          Contains("grad_output data pointer is null"));
        CHECK_THROWS_WITH(block.backward(view(x.data(), S), view(dy.data(), S), view(null, S)),
                          Contains("grad_input data pointer is null"));
        CHECK_THROWS_WITH(block.backward(view(x.data(), S), view(dy.data(), S), view(dy.data() + 1, S)),
                          Contains("grad_input overlaps grad_output"));
        CHECK_THROWS_WITH(block.backward(view(x.data(), S), view(dy.data(), S), view(x.data() + 3, S)),
                          Contains("grad_input overlaps input"));
        CHECK(same_bytes(bn_state(block.bn()), bn0));
        CHECK(same_bytes(conv_state(block.conv()), c0));
        CHECK(same_bytes(dx, dx0));
        // A retry after the failures gives what one clean call gives (nothing was counted twice).
        block.backward(view(x.data(), S), view(dy.data(), S), view(dx.data(), S));
        vf::ConvBnReLU3d<> fresh(vf::Conv3d<>(4, 4, 3, 1, 1), vf::BatchNorm3d<>(4));
        auto y2 = y, dx2 = dx0;
        fresh.forward(view(x.data(), S), view(y2.data(), S));
        fresh.backward(view(x.data(), S), view(dy.data(), S), view(dx2.data(), S));
        CHECK(same_bytes(bn_state(block.bn()), bn_state(fresh.bn())));
        CHECK(same_bytes(conv_state(block.conv()), conv_state(fresh.conv())));
        CHECK(same_bytes(dx, dx2));
    };
    SECTION("ncdhw") { run([](float* p, const sizes5& s) { return nc(p, s); }); }
    SECTION("ndhwc") { run([](float* p, const sizes5& s) { return nd(p, s); }); }
}

TEST_CASE("outputs that partially overlap an input are errors", "[robustness]")
{
    auto buf = ramp(4 * numel(S));
    const auto before = buf;
    float* x = buf.data();
    vf::MaxPool3d mp(2);
    CHECK_THROWS_WITH(mp.forward(nc(x, S), nc(x + 5, {2, 4, 2, 2, 2})), Equals("output overlaps input"));
    CHECK_THROWS_WITH(mp.forward(nc(x, S), nc(x, {2, 4, 2, 2, 2})), Equals("output overlaps input"));
    vf::AdaptiveAvgPool3d ap(1);
    CHECK_THROWS_WITH(ap.forward(nc(x, S), nc(x + numel(S) - 1, {2, 4, 1, 1, 1})), Equals("output overlaps input"));
    CHECK_THROWS_WITH(vf::reorder(nc(x, S), nd(x + 7, S)), Equals("reorder: source and destination overlap"));
    vf::BatchNorm3d<> bn(4);
    CHECK_THROWS_WITH(bn.forward(nc(x, S), nc(x + 1, S)), Contains("output partially overlaps input"));
    CHECK_THROWS_WITH(vf::evaluate(nc(x + 16, S), vf::relu(nc(x, S))), Contains("output partially overlaps input"));
    vf::Conv3d<> conv(4, 4, 3, 1, 1);
    CHECK_THROWS_WITH(conv.forward(nc(x, S), nc(x + 64, S)), Equals("output overlaps input"));
    CHECK(same_bytes(buf, before));
    CHECK(bn.num_batches_tracked() == 0);
    // In place stays allowed where PyTorch's in-place forms exist.
    bn.forward(nc(x, S), nc(x, S));
    vf::evaluate(nc(x, S), vf::relu(nc(x, S)));
}

TEST_CASE("BatchNorm3d::backward must get the epilogue its forward applied", "[robustness]")
{
    auto x = ramp(numel(S)), y = ramp(numel(S)), dy = ramp(numel(S), 0.5f), dx = ramp(numel(S), 0.2f);
    vf::BatchNorm3d<> bn(4);
    bn.forward(nc(x.data(), S), nc(y.data(), S), vf::relu);
    const auto st = bn_state(bn);
    const auto dx0 = dx;
    CHECK_THROWS_WITH(bn.backward(nc(x.data(), S), nc(dy.data(), S), nc(dx.data(), S)),
                      Contains("the last forward applied relu") && Contains("backward was given identity"));
    CHECK(same_bytes(bn_state(bn), st));
    CHECK(same_bytes(dx, dx0));
    bn.backward(nc(x.data(), S), nc(dy.data(), S), nc(dx.data(), S), vf::relu);
    bn.forward(nc(x.data(), S), nc(y.data(), S));
    CHECK_THROWS_WITH(bn.backward(nc(x.data(), S), nc(dy.data(), S), nc(dx.data(), S), vf::relu),
                      Contains("the last forward applied identity") && Contains("backward was given relu"));
    // vf::evaluate(Y, vf::relu(bn(X))) is forward with relu: it pairs the same way.
    vf::evaluate(nc(y.data(), S), vf::relu(bn(nc(x.data(), S))));
    bn.backward(nc(x.data(), S), nc(dy.data(), S), nc(dx.data(), S), vf::relu);
}

TEST_CASE("pooling follows PyTorch's output-size rules and messages", "[robustness]")
{
    // Values from torch 1.13: floor division, so a window larger than the input is an error.
    using arr = std::array<index_t, 5>;
    CHECK(vf::MaxPool3d(3, 2, 1).output_sizes({2, 4, 4, 4, 4}) == arr{2, 4, 2, 2, 2});
    CHECK(vf::MaxPool3d(5, std::nullopt, 2).output_sizes({2, 4, 4, 4, 4}) == arr{2, 4, 1, 1, 1});
    CHECK(vf::MaxPool3d(2).output_sizes({0, 4, 5, 5, 5}) == arr{0, 4, 2, 2, 2});
    CHECK_THROWS_WITH(vf::MaxPool3d(8).output_sizes({2, 4, 4, 4, 4}),
                      Equals("Given input size: (4x4x4x4). Calculated output size: (4x0x0x0). Output size is too small"));
    CHECK_THROWS_WITH(vf::MaxPool3d(5).output_sizes({2, 4, 4, 4, 4}), Contains("Output size is too small"));
    CHECK_THROWS_WITH(vf::MaxPool3d(2).output_sizes({2, 4, 0, 4, 4}),
                      Equals("max_pool3d(): Expected input's non-batch dimensions to have positive length, but input "
                             "has a shape of [2, 4, 0, 4, 4] and non-batch dimension 2 has length zero!"));
    CHECK_THROWS_WITH(vf::MaxPool3d(2, std::nullopt, 2),
                      Equals("pad should be at most half of kernel size, but got pad=2 and kernel_size=2"));
    CHECK_THROWS_WITH(vf::MaxPool3d(3, std::nullopt, 2),
                      Equals("pad should be at most half of kernel size, but got pad=2 and kernel_size=3"));
    CHECK_THROWS_WITH(vf::MaxPool3d(2, std::nullopt, -1), Equals("pad must be non-negative, but got pad: -1"));
    CHECK_THROWS_WITH(vf::MaxPool3d(0), Equals("stride should not be zero"));
    CHECK_THROWS_WITH(vf::MaxPool3d(0, 1), Equals("kernel size should be greater than zero, but got kT: 0 kH: 0 kW: 0"));
    CHECK_THROWS_WITH(vf::MaxPool3d(2, -1), Equals("stride should be greater than zero, but got dT: -1 dH: -1 dW: -1"));
    // A kernel far larger than the input with padding that makes one output: only the window's
    // part inside the input is visited (no loop over the padding).
    {
        const index_t big = index_t(1) << 40;
        vf::MaxPool3d huge({big, 1, 1}, std::nullopt, {big / 2, 0, 0});
        auto x = ramp(8);
        std::vector<float> y(2);
        huge.forward(nc(x.data(), {1, 1, 8, 1, 1}), nc(y.data(), {1, 1, 1, 1, 1}));
        CHECK(y[0] == *std::max_element(x.begin(), x.end()));
    }
    // AdaptiveAvgPool3d: output_size 0 is allowed (an empty output, as in PyTorch); an empty
    // spatial input is an error (PyTorch 1.13 returns NaN there; later versions raise).
    CHECK(vf::AdaptiveAvgPool3d(0).output_sizes({2, 4, 4, 4, 4}) == arr{2, 4, 0, 0, 0});
    CHECK_THROWS_WITH(vf::AdaptiveAvgPool3d(-1),
                      Equals("adaptive_avg_pool3d: elements of output_size must be greater than or equal to 0 but "
                             "received {-1, -1, -1}"));
    std::vector<float> x(4), y(8, 7.f);
    CHECK_THROWS_WITH(vf::AdaptiveAvgPool3d(1).forward(nc(x.data(), {2, 4, 0, 4, 4}), nc(y.data(), {2, 4, 1, 1, 1})),
                      Contains("Expected input to have non-zero size for non-batch dimensions") &&
                          Contains("dimension 2 being empty"));
    CHECK(y == std::vector<float>(8, 7.f));
}

TEST_CASE("sizes are computed with overflow checks before anything runs", "[robustness]")
{
    const index_t big = index_t(1) << 33;
    CHECK_THROWS_WITH(vf::Linear(big, big), Equals("Storage size calculation overflowed with sizes=[8589934592, 8589934592]"));
    CHECK_THROWS_WITH(vf::Linear(-1, 3), Equals("Trying to create tensor with negative dimension -1: [3, -1]"));
    CHECK_THROWS_WITH(vf::Conv3d<>(4, 4, 3, 1, index_t(1) << 62), Contains("overflow a 64-bit size"));
    CHECK_THROWS_WITH(vf::Conv3d<>(big, big, 3), Contains("Storage size calculation overflowed"));
    // A padding whose sum with the input size overflows: a message, not undefined behaviour.
    vf::Conv3d<> conv(1, 1, 1, 1, (index_t(1) << 61) + 1);
    std::vector<float> x(64), y(64);
    const index_t huge = std::numeric_limits<index_t>::max() - 8;
    CHECK_THROWS_WITH(conv.forward(nc(x.data(), {1, 1, 1, 1, huge}), nc(y.data(), {1, 1, 1, 1, 1})),
                      Contains("Storage size calculation overflowed"));
    CHECK_THROWS_WITH(conv.forward(nc(x.data(), {0, 1, 1, 1, huge}), nc(y.data(), {0, 1, 1, 1, 1})),
                      Contains("Calculated padded input size per channel overflows"));
    // Views whose element count (or byte count) does not fit: rejected by every call.
    vf::BatchNorm3d<> bn(4);
    const sizes5 too_many{index_t(1) << 30, 1, index_t(1) << 31, 1, 1}; // 2^61 elements: 2^63 bytes
    CHECK_THROWS_WITH(bn.forward(nc(x.data(), too_many), nc(y.data(), too_many)),
                      Equals("Storage size calculation overflowed with sizes=[1073741824, 1, 2147483648, 1, 1]"));
    CHECK_THROWS_WITH(bn.forward(nc(x.data(), {-2, 4, 4, 4, 4}), nc(y.data(), {-2, 4, 4, 4, 4})),
                      Equals("Trying to create tensor with negative dimension -2: [-2, 4, 4, 4, 4]"));
    CHECK_THROWS_WITH(vf::reorder(nc(x.data(), too_many), nd(y.data(), too_many)), Contains("overflowed"));
    // nCdhw16c pads C to whole blocks: its storage is checked too (2^59 elements, 2^63 padded).
    CHECK_THROWS_WITH(vf::reorder(vf::nCdhw16c_view(x.data(), index_t(1) << 59, 1, 1, 1, 1),
                                  vf::ndhwc_view(y.data(), index_t(1) << 59, 1, 1, 1, 1)),
                      Contains("overflowed"));
    CHECK(bn.num_batches_tracked() == 0);
}
