// BatchNorm3d<C, double>: the float64 element type through the same kernel templates.
// Checked against a long double reference written here (independent of the kernels), with
// float64 error bounds, in every layout, static and dynamic C, both statistics policies,
// with and without ReLU, train and eval; and the gradients against central finite
// differences (what torch.autograd.gradcheck does).
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <optional>
#include <random>
#include <vector>

#include "support.hpp"

using ld = long double;

namespace {

constexpr double eps_d = std::numeric_limits<double>::epsilon();

std::vector<double> randn_d(index_t n, std::mt19937& g, double mean = 0, double sd = 1)
{
    std::normal_distribution<double> nd(mean, sd);
    std::vector<double> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = nd(g);
    return v;
}

/// torch.nn.BatchNorm3d (+ReLU) in long double, textbook two-pass.
struct ref {
    std::vector<ld> mean, var, invstd, pre, y, dx, gw, gb;
    std::vector<ld> mean_abs; // sum |x| / n: the scale of the mean's rounding error
    ld unbiased(index_t c, index_t n) const { return var[c] * n / (n - 1); }
    void forward(const std::vector<double>& x, const sizes5& s, const std::vector<double>& gamma,
                 const std::vector<double>& beta, bool batch, const std::vector<double>& rm,
                 const std::vector<double>& rv, double eps, bool relu)
    {
        const index_t C = s[1], n = numel(s) / C;
        mean.assign(C, 0), var.assign(C, 0), invstd.assign(C, 0), mean_abs.assign(C, 0);
        for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) { mean_abs[c] += std::abs(x[i]); });
        for (auto& m : mean_abs) m /= n;
        if (batch) {
            for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) { mean[c] += x[i]; });
            for (auto& m : mean) m /= n;
            for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
                var[c] += (x[i] - mean[c]) * (x[i] - mean[c]);
            });
            for (auto& v : var) v /= n;
        } else {
            for (index_t c = 0; c < C; ++c) mean[c] = rm[c], var[c] = rv[c];
        }
        for (index_t c = 0; c < C; ++c) invstd[c] = 1 / std::sqrt(var[c] + static_cast<ld>(eps));
        pre.assign(x.size(), 0), y.assign(x.size(), 0);
        for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
            const ld g = gamma.empty() ? 1 : gamma[c], b = beta.empty() ? 0 : beta[c];
            pre[i] = (x[i] - mean[c]) * invstd[c] * g + b;
            y[i] = relu && pre[i] <= 0 ? 0 : pre[i];
        });
    }
    void backward(const std::vector<double>& x, const std::vector<double>& dy, const sizes5& s,
                  const std::vector<double>& gamma, bool batch, bool relu)
    {
        const index_t C = s[1], n = numel(s) / C;
        dx.assign(x.size(), 0), gw.assign(C, 0), gb.assign(C, 0);
        std::vector<ld> g(x.size());
        for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
            g[i] = relu && pre[i] <= 0 ? 0 : dy[i];
            gb[c] += g[i];
            gw[c] += g[i] * (x[i] - mean[c]) * invstd[c];
        });
        for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
            const ld gm = gamma.empty() ? 1 : gamma[c], xhat = (x[i] - mean[c]) * invstd[c];
            dx[i] = batch ? gm * invstd[c] / n * (n * g[i] - gb[c] - xhat * gw[c]) : g[i] * invstd[c] * gm;
        });
    }
};

/// |a - b| <= tol.
bool near(double a, ld b, double tol) { return std::abs(static_cast<ld>(a) - b) <= tol; }

struct config {
    bool train, relu, affine, track;
    std::optional<double> momentum;
    vf::batch_stats_policy policy;
};

/// Forward + backward of module bn on layout L against the reference, float64 bounds.
template <class L, class BN>
void check_case(BN& bn, const sizes5& s, const config& k, std::mt19937& g, double data_mean)
{
    const index_t C = s[1], n = numel(s) / C;
    const auto x = randn_d(numel(s), g, data_mean, 2.0), dy = randn_d(numel(s), g);
    if (k.affine)
        for (index_t c = 0; c < C; ++c) bn.weight()[c] = 0.5 + 0.1 * c, bn.bias()[c] = 0.2 * c - 1.0;
    if (k.track)
        for (index_t c = 0; c < C; ++c) bn.running_mean()[c] = data_mean + 0.05 * c, bn.running_var()[c] = 3.0 + c;
    bn.train(k.train);
    bn.set_stats_policy(k.policy);
    const std::vector<double> gamma(bn.weight().begin(), bn.weight().end()), beta(bn.bias().begin(), bn.bias().end()),
        rm(bn.running_mean().begin(), bn.running_mean().end()), rv(bn.running_var().begin(), bn.running_var().end());
    const bool batch = k.train || !k.track;
    ref r;
    r.forward(x, s, gamma, beta, batch, rm, rv, bn.eps(), k.relu);

    auto xm = to_layout<L>(x, s), ym = to_layout<L>(std::vector<double>(x.size()), s);
    auto dym = to_layout<L>(dy, s), dxm = to_layout<L>(std::vector<double>(x.size()), s);
    auto X = view_of<L>(xm.data(), s), Y = view_of<L>(ym.data(), s);
    if (k.relu) bn.forward(X.as_const(), Y, vf::relu);
    else bn.forward(X.as_const(), Y);
    const auto y = from_layout<L>(ym, s);
    for (index_t i = 0; i < numel(s); ++i) {
        const index_t c = i / (s[2] * s[3] * s[4]) % C;
        const ld scale = r.invstd[c] * (gamma.empty() ? 1 : std::abs(gamma[c]));
        // a few roundings of |x - mean| * scale + |beta|, and the mean's own rounding: a sum of up to
        // n terms in one chain (NDHWC), whose worst case is n eps sum|x| (a variance's likewise)
        const double tol = static_cast<double>((n + 16) * eps_d * (std::abs(x[i] - r.mean[c]) * scale +
                                                              (beta.empty() ? 0 : std::abs(beta[c])) +
                                                              r.mean_abs[c] * scale));
        if (!near(y[i], r.y[i], tol)) {
            INFO("i " << i << " y " << y[i] << " ref " << static_cast<double>(r.y[i]) << " diff "
                      << static_cast<double>(y[i] - r.y[i]) << " tol " << tol);
            REQUIRE(near(y[i], r.y[i], tol));
        }
    }
    if (k.train && k.track) {
        const double m = k.momentum ? *k.momentum : 1.0;
        for (index_t c = 0; c < C; ++c) {
            const ld em = m * r.mean[c] + (1 - m) * rm[c], ev = m * r.unbiased(c, n) + (1 - m) * rv[c];
            // the mean's and the variance's sums as y's bound; the fast policy's shifted sum of
            // squares loses up to (mean_abs^2 / var) more in its M2 - n (mean - shift)^2
            CHECK(near(bn.running_mean()[c], em, (n + 16) * eps_d * (std::abs(em) + r.mean_abs[c])));
            CHECK(near(bn.running_var()[c], ev,
                       static_cast<double>((n + 16) * eps_d * std::abs(ev) *
                                           (1 + r.mean_abs[c] * r.mean_abs[c] / r.var[c]))));
        }
    }
    if (k.relu) bn.backward(X.as_const(), view_of<L>(dym.data(), s).as_const(), view_of<L>(dxm.data(), s), vf::relu);
    else bn.backward(X.as_const(), view_of<L>(dym.data(), s).as_const(), view_of<L>(dxm.data(), s));
    r.backward(x, dy, s, gamma, batch, k.relu);
    const auto dx = from_layout<L>(dxm, s);
    ld sum_abs = 0;
    for (double v : dy) sum_abs += std::abs(v);
    for (index_t i = 0; i < numel(s); ++i) {
        const index_t c = i / (s[2] * s[3] * s[4]) % C;
        const ld scale = r.invstd[c] * (gamma.empty() ? 1 : std::abs(gamma[c]));
        // dx is a difference of terms of size scale * (|dy| + sum|dy|/n * (1 + |xhat|)); xhat
        // carries the mean's rounding (as y's bound)
        const ld xhat = std::abs(x[i] - r.mean[c]) * r.invstd[c], mhat = r.mean_abs[c] * r.invstd[c];
        const double tol = static_cast<double>((n + 16) * eps_d * scale *
                                               (std::abs(dy[i]) + sum_abs / (n / 1.0L) * (1 + xhat + mhat)));
        if (!near(dx[i], r.dx[i], tol)) {
            INFO("i " << i << " dx " << dx[i] << " ref " << static_cast<double>(r.dx[i]) << " tol " << tol);
            REQUIRE(near(dx[i], r.dx[i], tol));
        }
    }
    if (k.affine)
        for (index_t c = 0; c < C; ++c) {
            CHECK(near(bn.bias_grad()[c], r.gb[c], 64 * eps_d * sum_abs));
            CHECK(near(bn.weight_grad()[c], r.gw[c], 256 * eps_d * sum_abs * (1 + std::abs(data_mean))));
        }
}

template <index_t SC, class L>
void run_configs(const sizes5& s, std::uint32_t seed)
{
    std::mt19937 g(seed);
    for (bool train : {true, false})
        for (bool relu : {false, true})
            for (bool affine : {true, false})
                for (bool track : {true, false})
                    for (auto policy : {vf::batch_stats_policy::fast, vf::batch_stats_policy::aten})
                        for (double data_mean : {0.0, 1e3}) {
                            const std::optional<double> momentum = track && !affine ? std::nullopt : std::optional(0.1);
                            const config k{train, relu, affine, track, momentum, policy};
                            INFO(L::name << " C " << s[1] << (SC == vf::dynamic ? " dynamic" : " static")
                                         << " train " << train << " relu " << relu << " affine " << affine
                                         << " track " << track << " aten " << (policy == vf::batch_stats_policy::aten)
                                         << " mean " << data_mean);
                            vf::BatchNorm3d<SC, double> bn(s[1], 1e-5, momentum, affine, track);
                            check_case<L>(bn, s, k, g, data_mean);
                        }
}

} // namespace

TEST_CASE("BatchNorm3d<double>: forward, running statistics and backward against a long double reference",
          "[double]")
{
    // channel tails (C = 19: one full and one partial 16-channel block, SIMD tails across
    // channels), inner runs with tails (D*H*W = 3*5*7), N = 2
    const sizes5 s{2, 19, 3, 5, 7};
    run_configs<vf::dynamic, vf::ncdhw_t>(s, 1);
    run_configs<vf::dynamic, vf::ndhwc_t>(s, 2);
    run_configs<vf::dynamic, vf::nCdhw16c_t>(s, 3);
    run_configs<19, vf::ncdhw_t>(s, 4);
    run_configs<19, vf::ndhwc_t>(s, 5);
    run_configs<19, vf::nCdhw16c_t>(s, 6);
    // several channels per thread range (the pipelined NCDHW phases), long inner runs
    run_configs<vf::dynamic, vf::ncdhw_t>({3, 6, 4, 9, 10}, 7);
    run_configs<8, vf::ndhwc_t>({3, 8, 4, 9, 10}, 8);
}

TEST_CASE("BatchNorm3d<double>: gradients equal central finite differences (gradcheck)", "[double]")
{
    // L = sum(w .* relu?(bn(x))) as a function of x, weight and bias; batch statistics.
    const sizes5 s{2, 3, 2, 3, 2};
    const index_t N = numel(s), C = s[1];
    std::mt19937 g(11);
    const auto x0 = randn_d(N, g), wt = randn_d(N, g);
    for (bool relu : {false, true})
        for (bool train : {true, false}) {
            INFO("relu " << relu << " train " << train);
            vf::BatchNorm3d<vf::dynamic, double> bn(C);
            for (index_t c = 0; c < C; ++c) bn.weight()[c] = 1.0 + 0.3 * c, bn.bias()[c] = 0.1 - 0.2 * c;
            for (index_t c = 0; c < C; ++c) bn.running_mean()[c] = 0.1 * c, bn.running_var()[c] = 0.5 + c;
            auto loss = [&](std::vector<double> x) {
                vf::BatchNorm3d<vf::dynamic, double> m = bn; // a copy: running statistics untouched
                m.train(train);
                std::vector<double> y(x.size());
                auto X = vf::ncdhw_view(x.data(), s[0], s[1], s[2], s[3], s[4]);
                auto Y = vf::ncdhw_view(y.data(), s[0], s[1], s[2], s[3], s[4]);
                if (relu) m.forward(X.as_const(), Y, vf::relu);
                else m.forward(X.as_const(), Y);
                ld l = 0;
                for (index_t i = 0; i < N; ++i) l += static_cast<ld>(wt[i]) * y[i];
                return static_cast<double>(l);
            };
            // analytic
            vf::BatchNorm3d<vf::dynamic, double> m = bn;
            m.train(train);
            std::vector<double> x = x0, y(N), dx(N), dy = wt;
            auto X = vf::ncdhw_view(x.data(), s[0], s[1], s[2], s[3], s[4]);
            auto Y = vf::ncdhw_view(y.data(), s[0], s[1], s[2], s[3], s[4]);
            auto DY = vf::ncdhw_view(dy.data(), s[0], s[1], s[2], s[3], s[4]);
            auto DX = vf::ncdhw_view(dx.data(), s[0], s[1], s[2], s[3], s[4]);
            if (relu) {
                m.forward(X.as_const(), Y, vf::relu);
                m.backward(X.as_const(), DY.as_const(), DX, vf::relu);
            } else {
                m.forward(X.as_const(), Y);
                m.backward(X.as_const(), DY.as_const(), DX);
            }
            const double h = 1e-6; // gradcheck's eps; its atol 1e-5, rtol 1e-3
            for (index_t i = 0; i < N; ++i) {
                auto xp = x0, xn = x0;
                xp[i] += h, xn[i] -= h;
                const double num = (loss(xp) - loss(xn)) / (2 * h);
                CHECK(std::abs(num - dx[i]) <= 1e-5 + 1e-3 * std::abs(num));
            }
            for (index_t c = 0; c < C; ++c)
                for (int which : {0, 1}) {
                    const double keep = which ? bn.bias()[c] : bn.weight()[c];
                    auto set = [&](double v) { (which ? bn.bias() : bn.weight())[c] = v; };
                    set(keep + h);
                    const double lp = loss(x0);
                    set(keep - h);
                    const double ln = loss(x0);
                    set(keep);
                    const double num = (lp - ln) / (2 * h), ana = which ? m.bias_grad()[c] : m.weight_grad()[c];
                    CHECK(std::abs(num - ana) <= 1e-5 + 1e-3 * std::abs(num));
                }
        }
}

TEST_CASE("BatchNorm3d<double>: in place, argument checks count 8-byte elements, state unchanged on error",
          "[double]")
{
    const sizes5 s{2, 4, 3, 3, 3};
    std::mt19937 g(5);
    auto x = randn_d(numel(s), g);
    const auto x0 = x;
    vf::BatchNorm3d<vf::dynamic, double> a(4), b(4);
    std::vector<double> y(x.size());
    a.forward(vf::ncdhw_view(x.data(), s[0], s[1], s[2], s[3], s[4]).as_const(),
              vf::ncdhw_view(y.data(), s[0], s[1], s[2], s[3], s[4]));
    auto X = vf::ncdhw_view(x.data(), s[0], s[1], s[2], s[3], s[4]);
    b.forward(X.as_const(), X); // in place
    for (std::size_t i = 0; i < x.size(); ++i) CHECK(x[i] == y[i]);
    CHECK(std::vector<double>(a.running_var().begin(), a.running_var().end()) ==
          std::vector<double>(b.running_var().begin(), b.running_var().end()));

    // An output starting in the last element of the input overlaps it only when elements are
    // counted as 8 bytes: the check must see it.
    std::vector<double> buf(2 * x.size());
    std::copy(x0.begin(), x0.end(), buf.begin());
    const auto rv = std::vector<double>(a.running_var().begin(), a.running_var().end());
    const auto nbt = a.num_batches_tracked();
    auto in = vf::ncdhw_view(buf.data(), s[0], s[1], s[2], s[3], s[4]);
    auto out = vf::ncdhw_view(buf.data() + x.size() - 1, s[0], s[1], s[2], s[3], s[4]);
    REQUIRE_THROWS_WITH(a.forward(in.as_const(), out), Catch::Contains("partially overlaps"));
    CHECK(std::vector<double>(a.running_var().begin(), a.running_var().end()) == rv);
    CHECK(a.num_batches_tracked() == nbt);
    // wrong channel count: PyTorch's message
    auto X5 = vf::ncdhw_view(buf.data(), 2, 5, 3, 3, 3);
    std::vector<double> y5(2 * 5 * 27);
    REQUIRE_THROWS_WITH(a.forward(X5.as_const(), vf::ncdhw_view(y5.data(), 2, 5, 3, 3, 3)),
                        "running_mean should contain 5 elements not 4");
    CHECK(a.num_batches_tracked() == nbt);
}

TEST_CASE("BatchNorm3d<double> and BatchNorm3d<float> agree to float precision", "[double]")
{
    const sizes5 s{2, 5, 4, 4, 4};
    std::mt19937 g(9);
    const auto xd = randn_d(numel(s), g, 0.5, 1.5);
    std::vector<float> xf(xd.begin(), xd.end()), yf(xd.size());
    std::vector<double> xr(xf.begin(), xf.end()), yd(xd.size());
    vf::BatchNorm3d<> bf(5);
    vf::BatchNorm3d<vf::dynamic, double> bd(5);
    bf.forward(vf::ndhwc_view(xf.data(), s[0], s[1], s[2], s[3], s[4]).as_const(),
               vf::ndhwc_view(yf.data(), s[0], s[1], s[2], s[3], s[4]), vf::relu);
    bd.forward(vf::ndhwc_view(xr.data(), s[0], s[1], s[2], s[3], s[4]).as_const(),
               vf::ndhwc_view(yd.data(), s[0], s[1], s[2], s[3], s[4]), vf::relu);
    for (std::size_t i = 0; i < yd.size(); ++i) CHECK(std::abs(yf[i] - yd[i]) <= 1e-5 * (1 + std::abs(yd[i])));
    for (index_t c = 0; c < 5; ++c) CHECK(std::abs(bf.running_var()[c] - bd.running_var()[c]) <= 1e-6);
    CHECK(bd.kernel_choice().why.find("element type") != std::string::npos);
}
