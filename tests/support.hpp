// Test support: tensors in logical NCDHW order, conversion to/from volfuse layouts,
// a float64 scalar reference of BatchNorm3d (independent of the library's kernels),
// and error-bound helpers.
#pragma once

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <catch2/catch.hpp>
#include <volfuse/volfuse.hpp>

namespace vf = volfuse;
using vf::index_t;
using sizes5 = std::array<index_t, 5>;

inline index_t numel(const sizes5& s) { return s[0] * s[1] * s[2] * s[3] * s[4]; }
inline index_t logical_index(const sizes5& s, index_t n, index_t c, index_t d, index_t h, index_t w)
{
    return (((n * s[1] + c) * s[2] + d) * s[3] + h) * s[4] + w;
}

/// Calls f(n, c, d, h, w, logical_index) for every element.
template <class F>
void for_each_index(const sizes5& s, F&& f)
{
    for (index_t n = 0; n < s[0]; ++n)
        for (index_t c = 0; c < s[1]; ++c)
            for (index_t d = 0; d < s[2]; ++d)
                for (index_t h = 0; h < s[3]; ++h)
                    for (index_t w = 0; w < s[4]; ++w) f(n, c, d, h, w, logical_index(s, n, c, d, h, w));
}

template <class L, class T>
auto view_of(T* p, const sizes5& s)
{
    return vf::make_view<L>(p, s[0], s[1], s[2], s[3], s[4]);
}

/// Value blocked layouts' padding lanes hold in tests (kernels must neither read nor write it).
constexpr float padding_sentinel = -12345.f;

/// Logical NCDHW data -> memory in layout L (padding lanes = padding_sentinel), and back.
template <class L, class T>
std::vector<T> to_layout(const std::vector<T>& logical, const sizes5& s)
{
    std::vector<T> out(static_cast<std::size_t>(vf::storage_size<L>(view_of<L>(static_cast<T*>(nullptr), s).shape())),
                       static_cast<T>(padding_sentinel));
    auto v = view_of<L>(out.data(), s);
    for_each_index(s, [&](index_t n, index_t c, index_t d, index_t h, index_t w, index_t i) { v(n, c, d, h, w) = logical[i]; });
    return out;
}
template <class L, class T>
std::vector<T> from_layout(std::vector<T>& mem, const sizes5& s)
{
    std::vector<T> out(static_cast<std::size_t>(numel(s)));
    auto v = view_of<L>(mem.data(), s);
    for_each_index(s, [&](index_t n, index_t c, index_t d, index_t h, index_t w, index_t i) { out[i] = v(n, c, d, h, w); });
    return out;
}

/// Memory `buf` of a tensor of sizes s in layout L: every padding lane of a blocked layout still
/// holds padding_sentinel (kernels neither read nor write them); plain layouts have none.
template <class L>
bool padding_untouched(const std::vector<float>& buf, const sizes5& s)
{
    if constexpr (std::is_same_v<L, vf::nCdhw16c_t>) {
        const index_t C = s[1], CB = (C + 15) / 16, S = s[2] * s[3] * s[4];
        for (index_t n = 0; n < s[0]; ++n)
            for (index_t i = 0; i < S; ++i)
                for (index_t l = C - (CB - 1) * 16; l < 16; ++l)
                    if (buf[static_cast<std::size_t>(((n * CB + CB - 1) * S + i) * 16 + l)] != padding_sentinel) return false;
    }
    return true;
}

inline std::vector<float> randn(index_t n, std::mt19937& g, double mean = 0.0, double stddev = 1.0)
{
    std::normal_distribution<double> nd(mean, stddev);
    std::vector<float> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = static_cast<float>(nd(g));
    return v;
}

inline bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }
inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b)
{
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}
template <class S>
std::vector<float> vec(S span) { return std::vector<float>(span.begin(), span.end()); }

constexpr double eps_f = std::numeric_limits<float>::epsilon();

/// Float64 reference of torch.nn.BatchNorm3d (+ optional ReLU), textbook two-pass.
struct reference {
    sizes5 s;
    std::vector<double> mean, var;       // statistics used to normalize (batch or running)
    std::vector<double> invstd, pre, y;  // pre = BN output before the epilogue

    /// batch_stats: normalize with batch statistics (else with rm/rv).
    void forward(const std::vector<float>& x, const sizes5& sz, const std::vector<float>& gamma,
                 const std::vector<float>& beta, bool batch_stats, const std::vector<float>& rm,
                 const std::vector<float>& rv, double eps, bool relu)
    {
        s = sz;
        const index_t C = s[1], n = numel(s) / std::max<index_t>(C, 1);
        mean.assign(C, 0.0);
        var.assign(C, 0.0);
        invstd.assign(C, 0.0);
        if (batch_stats) {
            for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) { mean[c] += x[i]; });
            for (auto& m : mean) m /= static_cast<double>(n);
            for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
                var[c] += (x[i] - mean[c]) * (x[i] - mean[c]);
            });
            for (auto& v : var) v /= static_cast<double>(n);
        } else {
            for (index_t c = 0; c < C; ++c) mean[c] = rm[c], var[c] = rv[c];
        }
        for (index_t c = 0; c < C; ++c)
            invstd[c] = (var[c] == 0 && eps == 0) ? 0.0 : 1.0 / std::sqrt(var[c] + eps);
        pre.assign(x.size(), 0.0);
        y.assign(x.size(), 0.0);
        for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
            const double g = gamma.empty() ? 1.0 : gamma[c], b = beta.empty() ? 0.0 : beta[c];
            pre[i] = (x[i] - mean[c]) * invstd[c] * g + b;
            y[i] = relu ? (pre[i] < 0 ? 0.0 : pre[i]) : pre[i];
        });
    }
    /// Unbiased batch variance, as the running estimate uses.
    double unbiased_var(index_t c) const
    {
        const double n = static_cast<double>(numel(s) / s[1]);
        return var[c] * n / (n - 1);
    }
    /// Error bound for a float32 result of this channel's BN at element i: a few
    /// roundings of the terms |x - mean| * alpha and |beta|, plus the mean's own
    /// representation error (volfuse carries the mean as a float hi + lo pair).
    double bound(const std::vector<float>& x, const std::vector<float>& gamma, const std::vector<float>& beta,
                 index_t c, index_t i) const
    {
        const double g = gamma.empty() ? 1.0 : std::abs(gamma[c]), b = beta.empty() ? 0.0 : std::abs(beta[c]);
        const double scale = invstd[c] * g;
        return 8 * eps_f * (std::abs(x[i] - mean[c]) * scale + b) + 4 * eps_f * eps_f * std::abs(mean[c]) * scale + 1e-30;
    }

    struct grads {
        std::vector<double> dx, gw, gb;
        std::vector<double> sum_abs_dy, sum_abs_dy_xhat; // per channel, for error bounds
    };
    /// Error bound for a float32 dx at element i: dx is a difference of terms of size
    /// gamma*invstd*(|dy| + sum|dy|/n + |xhat|*sum|dy*xhat|/n) that cancel (exactly,
    /// for n = 2), so the bound scales with those terms, not with dx.
    double dx_bound(const grads& r, const std::vector<float>& x, const std::vector<float>& dy,
                    const std::vector<float>& gamma, index_t c, index_t i) const
    {
        const double n = static_cast<double>(numel(s) / s[1]);
        const double g = gamma.empty() ? 1.0 : std::abs(gamma[c]);
        const double xhat = std::abs(x[i] - mean[c]) * invstd[c];
        const double terms = g * invstd[c] * (std::abs(dy[i]) + (r.sum_abs_dy[c] + xhat * r.sum_abs_dy_xhat[c]) / n);
        return (std::log2(n) + 8) * eps_f * terms + 1e-30;
    }
    /// Backward; `mask[i]` false where the ReLU blocks the gradient (taken from the
    /// forward's float output, as autograd does).
    grads backward(const std::vector<float>& x, const std::vector<float>& dy, const std::vector<float>& gamma,
                   bool batch_stats, const std::vector<bool>& mask) const
    {
        const index_t C = s[1], n = numel(s) / std::max<index_t>(C, 1);
        grads r{std::vector<double>(x.size()), std::vector<double>(C), std::vector<double>(C),
                std::vector<double>(C), std::vector<double>(C)};
        std::vector<double> g(x.size());
        for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
            g[i] = mask.empty() || mask[i] ? dy[i] : 0.0;
            r.gb[c] += g[i];
            r.gw[c] += g[i] * (x[i] - mean[c]) * invstd[c];
            r.sum_abs_dy[c] += std::abs(g[i]);
            r.sum_abs_dy_xhat[c] += std::abs(g[i] * (x[i] - mean[c]) * invstd[c]);
        });
        for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
            const double gm = gamma.empty() ? 1.0 : gamma[c];
            const double xhat = (x[i] - mean[c]) * invstd[c];
            r.dx[i] = batch_stats ? gm * invstd[c] / n * (n * g[i] - r.gb[c] - xhat * r.gw[c]) : g[i] * invstd[c] * gm;
        });
        return r;
    }
};

/// |a - b| <= tol, with a readable failure.
#define CHECK_NEAR(a, b, tol)                                                                                          \
    do {                                                                                                               \
        const double a_ = (a), b_ = (b), t_ = (tol);                                                                   \
        if (!(std::abs(a_ - b_) <= t_) && !(std::isnan(a_) && std::isnan(b_))) {                                      \
            INFO(#a " = " << a_ << ", " #b " = " << b_ << ", tol " << t_);                                             \
            CHECK(std::abs(a_ - b_) <= t_);                                                                            \
        }                                                                                                              \
    } while (0)

/// Runs a module on logical data through layout L, keeping the forward's buffers
/// so that backward sees the same X.
template <class L>
struct bn_run {
    sizes5 s;
    std::vector<float> x, y, dy, dx; // memory in layout L

    bn_run(const std::vector<float>& x_logical, const sizes5& sz) : s(sz), x(to_layout<L>(x_logical, sz)) {}

    /// Blocked layouts: every padding lane of every buffer still holds the sentinel.
    bool padding_untouched() const
    {
        for (const auto* buf : {&x, &y, &dy, &dx})
            if (!buf->empty() && !::padding_untouched<L>(*buf, s)) return false;
        return true;
    }

    template <class BN>
    std::vector<float> forward(BN& bn, bool relu)
    {
        y = to_layout<L>(std::vector<float>(static_cast<std::size_t>(numel(s)), std::numeric_limits<float>::quiet_NaN()), s);
        auto X = view_of<L>(x.data(), s);
        auto Y = view_of<L>(y.data(), s);
        if (relu) bn.forward(X, Y, vf::relu);
        else bn.forward(X, Y);
        return from_layout<L>(y, s);
    }
    template <class BN>
    std::vector<float> backward(BN& bn, const std::vector<float>& dy_logical, bool relu)
    {
        dy = to_layout<L>(dy_logical, s);
        dx = to_layout<L>(std::vector<float>(static_cast<std::size_t>(numel(s)), std::numeric_limits<float>::quiet_NaN()), s);
        auto X = view_of<L>(x.data(), s);
        auto DY = view_of<L>(dy.data(), s);
        auto DX = view_of<L>(dx.data(), s);
        if (relu) bn.backward(X, DY, DX, vf::relu);
        else bn.backward(X, DY, DX);
        return from_layout<L>(dx, s);
    }
};

/// Runs forward then backward for each mode in `modes` (true: training) and returns
/// everything the module produced: outputs, input gradients, running stats, parameter grads.
template <class L, class BN>
std::vector<std::vector<float>> trace(BN& bn, const std::vector<float>& x, const std::vector<float>& dy,
                                      const sizes5& s, bool relu, std::initializer_list<bool> modes = {true, true, false})
{
    std::vector<std::vector<float>> out;
    for (const bool train : modes) {
        bn.train(train);
        bn_run<L> r(x, s);
        out.push_back(r.forward(bn, relu));
        out.push_back(r.backward(bn, dy, relu));
        out.push_back(vec(bn.running_mean()));
        out.push_back(vec(bn.running_var()));
        out.push_back(vec(bn.weight_grad()));
        out.push_back(vec(bn.bias_grad()));
    }
    return out;
}

/// Everything a module holds that a failed call must leave as it was.
template <class BN>
struct module_state {
    std::vector<float> w, b, rm, rv, gw, gb;
    std::int64_t nbt;
    bool training;
    explicit module_state(const BN& m)
        : w(vec(m.weight())), b(vec(m.bias())), rm(vec(m.running_mean())), rv(vec(m.running_var())),
          gw(vec(m.weight_grad())), gb(vec(m.bias_grad())), nbt(m.num_batches_tracked()), training(m.training())
    {
    }
    bool operator==(const module_state& o) const
    {
        return same_bits(w, o.w) && same_bits(b, o.b) && same_bits(rm, o.rm) && same_bits(rv, o.rv) &&
               same_bits(gw, o.gw) && same_bits(gb, o.gb) && nbt == o.nbt && training == o.training;
    }
};
