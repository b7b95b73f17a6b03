// torch.nn.BatchNorm3d's rules (shared/SEMANTICS.md §1-§8), checked against a float64
// reference and against the rules themselves.
#include "support.hpp"

using L = vf::ncdhw_t;

TEST_CASE("construction: PyTorch's initial values, spans and repr", "[bn][semantics]")
{
    vf::BatchNorm3d<> bn(4);
    REQUIRE(bn.training());
    REQUIRE(vec(bn.weight()) == std::vector<float>(4, 1.f));
    REQUIRE(vec(bn.bias()) == std::vector<float>(4, 0.f));
    REQUIRE(vec(bn.running_mean()) == std::vector<float>(4, 0.f));
    REQUIRE(vec(bn.running_var()) == std::vector<float>(4, 1.f));
    REQUIRE(vec(bn.weight_grad()) == std::vector<float>(4, 0.f));
    REQUIRE(bn.num_batches_tracked() == 0);
    REQUIRE(bn.repr() == "BatchNorm3d(4, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)");

    vf::BatchNorm3d<> none(64, 1e-3, std::nullopt, false, false);
    REQUIRE(none.weight().empty());
    REQUIRE(none.bias().empty());
    REQUIRE(none.running_mean().empty());
    REQUIRE(none.running_var().empty());
    REQUIRE(none.weight_grad().empty());
    REQUIRE(none.repr() == "BatchNorm3d(64, eps=0.001, momentum=None, affine=False, track_running_stats=False)");

    vf::BatchNorm3d<64> s;
    REQUIRE(s.num_features() == 64);
    REQUIRE(vf::BatchNorm3d<64>(64, 1e-5, 0.01).repr() ==
            "BatchNorm3d(64, eps=1e-05, momentum=0.01, affine=True, track_running_stats=True)");
    REQUIRE(vf::BatchNorm3d<>(2, 1e-16, 1.0).repr() ==
            "BatchNorm3d(2, eps=1e-16, momentum=1.0, affine=True, track_running_stats=True)");
}

TEST_CASE("reset_running_stats and reset_parameters", "[bn][semantics]")
{
    vf::BatchNorm3d<> bn(3);
    std::mt19937 g(1);
    const sizes5 s{2, 3, 2, 2, 2};
    bn_run<L> r(randn(numel(s), g, 1.0, 2.0), s);
    r.forward(bn, false);
    bn.weight()[0] = 5.f;
    bn.bias()[1] = 2.f;
    REQUIRE(bn.num_batches_tracked() == 1);
    bn.reset_running_stats();
    REQUIRE(vec(bn.running_mean()) == std::vector<float>(3, 0.f));
    REQUIRE(vec(bn.running_var()) == std::vector<float>(3, 1.f));
    REQUIRE(bn.num_batches_tracked() == 0);
    REQUIRE(bn.weight()[0] == 5.f);
    bn.reset_parameters();
    REQUIRE(bn.weight()[0] == 1.f);
    REQUIRE(bn.bias()[1] == 0.f);
}

TEST_CASE("training: batch statistics, biased variance to normalize, unbiased into running_var", "[bn][semantics]")
{
    const double momentum = GENERATE(0.1, 0.3, 0.0, 1.0);
    vf::BatchNorm3d<> bn(5, 1e-5, momentum);
    std::mt19937 g(7);
    const sizes5 s{3, 5, 2, 3, 4};
    const auto x = randn(numel(s), g, 2.0, 3.0);
    bn_run<L> r(x, s);
    const auto y = r.forward(bn, false);
    reference ref;
    ref.forward(x, s, {}, {}, true, {}, {}, 1e-5, false);
    for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
        CHECK_NEAR(y[i], ref.y[i], ref.bound(x, {}, {}, c, i));
    });
    for (index_t c = 0; c < 5; ++c) {
        CHECK_NEAR(bn.running_mean()[c], momentum * ref.mean[c], 4e-7 * (1 + std::abs(ref.mean[c])));
        CHECK_NEAR(bn.running_var()[c], (1 - momentum) + momentum * ref.unbiased_var(c), 4e-7 * (1 + ref.var[c]));
    }
    REQUIRE(bn.num_batches_tracked() == 1);
}

TEST_CASE("momentum=None: running statistics are the plain average over batches", "[bn][semantics]")
{
    vf::BatchNorm3d<> bn(3, 1e-5, std::nullopt);
    std::mt19937 g(3);
    const sizes5 s{2, 3, 3, 3, 3};
    std::vector<double> mean_sum(3), var_sum(3);
    for (int step = 0; step < 3; ++step) {
        const auto x = randn(numel(s), g, step * 1.5, 1.0 + step);
        bn_run<L> r(x, s);
        r.forward(bn, true);
        reference ref;
        ref.forward(x, s, {}, {}, true, {}, {}, 1e-5, false);
        for (index_t c = 0; c < 3; ++c) mean_sum[c] += ref.mean[c], var_sum[c] += ref.unbiased_var(c);
        REQUIRE(bn.num_batches_tracked() == step + 1);
    }
    for (index_t c = 0; c < 3; ++c) {
        CHECK_NEAR(bn.running_mean()[c], mean_sum[c] / 3, 1e-6);
        CHECK_NEAR(bn.running_var()[c], var_sum[c] / 3, 1e-6 * var_sum[c]);
    }
}

TEST_CASE("num_batches_tracked counts training steps with tracking only", "[bn][semantics]")
{
    std::mt19937 g(5);
    const sizes5 s{2, 2, 2, 2, 2};
    bn_run<L> r(randn(numel(s), g), s);
    vf::BatchNorm3d<> bn(2, 1e-5, 0.5);
    r.forward(bn, false);
    r.forward(bn, false);
    REQUIRE(bn.num_batches_tracked() == 2);
    bn.eval();
    r.forward(bn, false);
    REQUIRE(bn.num_batches_tracked() == 2);
    vf::BatchNorm3d<> untracked(2, 1e-5, 0.1, true, false);
    r.forward(untracked, false);
    REQUIRE(untracked.num_batches_tracked() == 0);
}

TEST_CASE("eval uses running statistics; without tracking it uses batch statistics", "[bn][semantics]")
{
    std::mt19937 g(11);
    const sizes5 s{2, 3, 2, 3, 2};
    const auto x = randn(numel(s), g, 1.0, 2.0);
    vf::BatchNorm3d<> bn(3);
    const std::vector<float> rm{0.5f, -1.f, 2.f}, rv{0.25f, 4.f, 1.5f}, w{2.f, 0.5f, -1.f}, b{0.f, 1.f, -2.f};
    std::copy(rm.begin(), rm.end(), bn.running_mean().begin());
    std::copy(rv.begin(), rv.end(), bn.running_var().begin());
    std::copy(w.begin(), w.end(), bn.weight().begin());
    std::copy(b.begin(), b.end(), bn.bias().begin());
    bn.eval();
    bn_run<L> r(x, s);
    const auto y = r.forward(bn, false);
    reference ref;
    ref.forward(x, s, w, b, false, rm, rv, 1e-5, false);
    for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
        CHECK_NEAR(y[i], ref.y[i], ref.bound(x, w, b, c, i));
    });
    REQUIRE(vec(bn.running_mean()) == rm); // eval changes nothing

    vf::BatchNorm3d<> untracked(3, 1e-5, 0.1, true, false);
    untracked.eval();
    const auto yb = r.forward(untracked, false);
    ref.forward(x, s, {}, {}, true, {}, {}, 1e-5, false);
    for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
        CHECK_NEAR(yb[i], ref.y[i], ref.bound(x, {}, {}, c, i));
    });
}

TEST_CASE("one value per channel: an error in training, fine in eval with running stats", "[bn][semantics]")
{
    const sizes5 s{1, 4, 1, 1, 1};
    bn_run<L> r(std::vector<float>{1.f, 2.f, 3.f, 4.f}, s);
    vf::BatchNorm3d<> bn(4);
    REQUIRE_THROWS_WITH(r.forward(bn, false),
                        "Expected more than 1 value per channel when training, got input size [1, 4, 1, 1, 1]");
    bn.eval();
    const auto y = r.forward(bn, false);
    for (int c = 0; c < 4; ++c) CHECK_NEAR(y[c], (c + 1) / std::sqrt(1 + 1e-5), 1e-6);
    // eval without tracking normalizes with batch statistics, so the check still applies.
    vf::BatchNorm3d<> untracked(4, 1e-5, 0.1, true, false);
    untracked.eval();
    REQUIRE_THROWS_WITH(r.forward(untracked, false),
                        "Expected more than 1 value per channel when training, got input size [1, 4, 1, 1, 1]");
    // N=1 with D*H*W > 1, and N > 1 with D=H=W=1, are fine in training.
    bn_run<L> a(std::vector<float>{1, 2, 3, 4}, {1, 1, 1, 2, 2});
    bn_run<L> b(std::vector<float>{1, 2, 3, 4}, {4, 1, 1, 1, 1});
    vf::BatchNorm3d<> one(1);
    const auto ya = a.forward(one, false);
    const auto yb = b.forward(one, false);
    REQUIRE(same_bits(ya, yb));
    CHECK_NEAR(ya[0], -1.5 / std::sqrt(1.25 + 1e-5), 1e-6);
}

TEST_CASE("empty batch: no error, nothing written, num_batches_tracked still counts", "[bn][semantics]")
{
    vf::BatchNorm3d<> bn(3);
    float guard = 42.f;
    auto X = vf::ncdhw_view(&guard, 0, 3, 2, 2, 2);
    bn.forward(X, X, vf::relu);
    REQUIRE(guard == 42.f);
    REQUIRE(bn.num_batches_tracked() == 1); // PyTorch increments before the kernel
    REQUIRE(vec(bn.running_mean()) == std::vector<float>(3, 0.f));
    bn.backward(X, X, X, vf::relu);
    REQUIRE(vec(bn.weight_grad()) == std::vector<float>(3, 0.f));
    auto Z = vf::ndhwc_view(static_cast<float*>(nullptr), 2, 3, 0, 4, 4); // empty spatial extent, null is fine
    bn.forward(Z, Z);
    REQUIRE(bn.num_batches_tracked() == 2);
    vf::BatchNorm3d<> zero(0);
    REQUIRE_THROWS_WITH(zero.forward(X, X), "select(): index 0 out of range for tensor of size [0] at dimension 0");
}

TEST_CASE("affine=False normalizes without weight and bias", "[bn][semantics]")
{
    std::mt19937 g(13);
    const sizes5 s{2, 3, 2, 2, 3};
    const auto x = randn(numel(s), g, -1.0, 0.5);
    vf::BatchNorm3d<> bn(3, 1e-5, 0.1, false);
    bn_run<L> r(x, s);
    const auto y = r.forward(bn, false);
    reference ref;
    ref.forward(x, s, {}, {}, true, {}, {}, 1e-5, false);
    for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
        CHECK_NEAR(y[i], ref.y[i], ref.bound(x, {}, {}, c, i));
    });
    const auto dx = r.backward(bn, randn(numel(s), g), false);
    REQUIRE(bn.weight_grad().empty());
    REQUIRE(std::isfinite(dx[0]));
    // Without affine and tracking there is no channel check at all (PyTorch accepts any C).
    vf::BatchNorm3d<> bare(4, 1e-5, 0.1, false, false);
    REQUIRE_NOTHROW(r.forward(bare, true));
}

TEST_CASE("constant channel: output is exactly beta, zero gradient, variance never negative", "[bn][semantics]")
{
    for (const float level : {100.f, 1e4f, 1e7f}) {
        for (const double eps : {0.0, 1e-5}) {
            const sizes5 s{2, 2, 3, 4, 5};
            std::mt19937 g(17);
            auto x = randn(numel(s), g);
            for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
                if (c == 1) x[i] = level;
            });
            vf::BatchNorm3d<> bn(2, eps, 0.1);
            bn.bias()[1] = 0.25f;
            bn_run<L> r(x, s);
            const auto y = r.forward(bn, false);
            const auto dy = randn(numel(s), g);
            const auto dx = r.backward(bn, dy, false);
            reference ref;
            ref.forward(x, s, vec(bn.weight()), vec(bn.bias()), true, {}, {}, eps, false);
            const auto gr = ref.backward(x, dy, vec(bn.weight()), true, {});
            for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
                if (c == 1) {
                    REQUIRE(y[i] == 0.25f); // pytorch#5410: ATen 1.13 gives ~100 here for level 1e7
                    // eps = 0: invstd is 0 (ATen's InvStd), so no gradient; eps > 0: (dy - mean(dy)) / sqrt(eps).
                    if (eps == 0) REQUIRE(dx[i] == 0.f);
                    else CHECK_NEAR(dx[i], gr.dx[i], 1e-5 * std::abs(gr.dx[i]) + 1e-6);
                }
            });
            REQUIRE(bn.running_var()[1] == 0.9f); // (1 - m) * 1 + m * 0
            REQUIRE(bn.running_mean()[1] == static_cast<float>(0.1f * level));
        }
    }
}

TEST_CASE("eval with eps=0 and running_var=0 is not 'fixed': outputs are non-finite, as PyTorch's", "[bn][semantics]")
{
    // invstd = 1/sqrt(0) = inf (no guard in eval).  PyTorch gives NaN or inf per element
    // (x*inf + (beta - mean*inf)); so does volfuse ((x - mean)*inf + beta): x == mean gives NaN.
    vf::BatchNorm3d<> bn(1, 0.0);
    bn.running_var()[0] = 0.f;
    bn.eval();
    bn_run<L> r(std::vector<float>{1.f, 0.f, -2.f}, {1, 1, 1, 1, 3});
    const auto y = r.forward(bn, false);
    REQUIRE(y[0] == std::numeric_limits<float>::infinity());
    REQUIRE(std::isnan(y[1]));
    REQUIRE(y[2] == -std::numeric_limits<float>::infinity());
}

TEST_CASE("NaN in one channel poisons only that channel", "[bn][semantics]")
{
    std::mt19937 g(19);
    const sizes5 s{2, 3, 2, 2, 2};
    auto x = randn(numel(s), g);
    x[logical_index(s, 1, 1, 0, 1, 0)] = std::numeric_limits<float>::quiet_NaN();
    vf::BatchNorm3d<> bn(3);
    bn_run<L> r(x, s);
    const auto y = r.forward(bn, true);
    for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
        REQUIRE(std::isnan(y[i]) == (c == 1)); // relu keeps NaN
    });
    REQUIRE(std::isnan(bn.running_mean()[1]));
    REQUIRE(std::isfinite(bn.running_mean()[0]));
    REQUIRE(std::isfinite(bn.running_var()[2]));
    // ReLU's backward passes the gradient where the output is NaN (threshold_backward: NaN <= 0 is
    // false), so the poisoned channel's bias gradient is the plain sum of dy.
    const auto dy = randn(numel(s), g);
    r.backward(bn, dy, true);
    double sum = 0;
    for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
        if (c == 1) sum += dy[i];
    });
    CHECK_NEAR(bn.bias_grad()[1], sum, 1e-5);
    REQUIRE(std::isfinite(bn.bias_grad()[0]));
}

TEST_CASE("fused ReLU: keeps -0.0, gradient is 0 where the output is 0 or -0.0", "[bn][semantics][relu]")
{
    const sizes5 s{1, 1, 1, 2, 3};
    const std::vector<float> x{-3.f, -1.f, 0.5f, 1.f, 2.f, 0.5f};
    vf::BatchNorm3d<> bn(1);
    bn.weight()[0] = 0.f;    // pre-activation = (x - mean) * 0 + bias
    bn.bias()[0] = -0.f;     // -> -0.0 where x < mean, +0.0 elsewhere
    bn_run<L> r(x, s);
    const auto y = r.forward(bn, true);
    for (std::size_t i = 0; i < x.size(); ++i) {
        REQUIRE(y[i] == 0.f);
        REQUIRE(std::signbit(y[i]) == (x[i] < 0.f)); // mean is 0
    }
    const auto dx = r.backward(bn, std::vector<float>(6, 1.f), true);
    for (float v : dx) REQUIRE(v == 0.f);
    REQUIRE(bn.bias_grad()[0] == 0.f); // every output is 0 or -0.0: no gradient passes

    // Where the pre-activation is positive, the gradient passes; where negative, not.
    vf::BatchNorm3d<> bn2(1);
    bn_run<L> r2(x, s);
    const auto y2 = r2.forward(bn2, true);
    r2.backward(bn2, std::vector<float>(6, 1.f), true);
    float passed = 0;
    for (float v : y2) passed += v > 0 ? 1.f : 0.f;
    REQUIRE(bn2.bias_grad()[0] == passed);
}

TEST_CASE("backward accumulates into the gradients until zero_grad", "[bn][semantics]")
{
    std::mt19937 g(23);
    const sizes5 s{2, 2, 2, 2, 2};
    bn_run<L> r(randn(numel(s), g), s);
    vf::BatchNorm3d<> bn(2);
    r.forward(bn, false);
    const auto dy = randn(numel(s), g);
    r.backward(bn, dy, false);
    const auto once = vec(bn.bias_grad());
    r.backward(bn, dy, false);
    for (int c = 0; c < 2; ++c) REQUIRE(bn.bias_grad()[c] == once[c] + once[c]);
    bn.zero_grad();
    REQUIRE(vec(bn.bias_grad()) == std::vector<float>(2, 0.f));
}
