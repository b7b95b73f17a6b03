// Float64 reference of torch.nn.Conv3d (groups = 1) on logical NCDHW data: forward,
// grad input, grad weight, grad bias, each with a per-element error bound for a float
// result: a sum of K products computed in float (one rounding per fma) is within
// (K + 2) * u * sum|terms| of the exact sum (u = 2^-24), plus the output's own rounding.
#pragma once

#include <cmath>

#include "support.hpp"

struct conv_config {
    index_t in = 0, out = 0;
    vf::size3 k = 1, s = 1, p = 0, dil = 1;
    bool bias = true;
};

struct conv_reference {
    conv_config cf;
    sizes5 xs, ys;
    std::vector<double> y, y_bound, dx, dx_bound, dw, dw_bound, db, db_bound;

    static index_t out_extent(index_t i, index_t k, index_t s, index_t p, index_t d)
    {
        return (i + 2 * p - d * (k - 1) - 1) / s + 1;
    }

    conv_reference(const conv_config& c, const sizes5& x_sizes) : cf(c), xs(x_sizes)
    {
        ys = {xs[0], cf.out, out_extent(xs[2], cf.k.d, cf.s.d, cf.p.d, cf.dil.d),
              out_extent(xs[3], cf.k.h, cf.s.h, cf.p.h, cf.dil.h), out_extent(xs[4], cf.k.w, cf.s.w, cf.p.w, cf.dil.w)};
    }
    index_t taps() const { return cf.k.d * cf.k.h * cf.k.w; }

    /// Calls f(y index, x index, w index) for every product of the convolution.
    template <class F>
    void for_each_product(F&& f) const
    {
        for (index_t n = 0; n < ys[0]; ++n)
            for (index_t oc = 0; oc < ys[1]; ++oc)
                for (index_t od = 0; od < ys[2]; ++od)
                    for (index_t oh = 0; oh < ys[3]; ++oh)
                        for (index_t ow = 0; ow < ys[4]; ++ow) {
                            const index_t yi = (((n * ys[1] + oc) * ys[2] + od) * ys[3] + oh) * ys[4] + ow;
                            for (index_t ic = 0; ic < cf.in; ++ic)
                                for (index_t kd = 0; kd < cf.k.d; ++kd) {
                                    const index_t id = od * cf.s.d - cf.p.d + kd * cf.dil.d;
                                    if (id < 0 || id >= xs[2]) continue;
                                    for (index_t kh = 0; kh < cf.k.h; ++kh) {
                                        const index_t ih = oh * cf.s.h - cf.p.h + kh * cf.dil.h;
                                        if (ih < 0 || ih >= xs[3]) continue;
                                        for (index_t kw = 0; kw < cf.k.w; ++kw) {
                                            const index_t iw = ow * cf.s.w - cf.p.w + kw * cf.dil.w;
                                            if (iw < 0 || iw >= xs[4]) continue;
                                            const index_t xi = (((n * cf.in + ic) * xs[2] + id) * xs[3] + ih) * xs[4] + iw;
                                            const index_t wi = (((oc * cf.in + ic) * cf.k.d + kd) * cf.k.h + kh) * cf.k.w + kw;
                                            f(yi, xi, wi);
                                        }
                                    }
                                }
                        }
    }

    void forward(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& b)
    {
        y.assign(static_cast<std::size_t>(numel(ys)), 0.0);
        std::vector<double> mag(y.size(), 0.0);
        for_each_product([&](index_t yi, index_t xi, index_t wi) {
            const double t = static_cast<double>(x[xi]) * w[wi];
            y[yi] += t;
            mag[yi] += std::abs(t);
        });
        const index_t K = cf.in * taps() + 1;
        y_bound.resize(y.size());
        const index_t S = ys[2] * ys[3] * ys[4];
        for (std::size_t i = 0; i < y.size(); ++i) {
            const double bias = cf.bias ? b[(i / S) % cf.out] : 0.0;
            y[i] += bias;
            y_bound[i] = (K + 2) * 0x1p-24 * (mag[i] + std::abs(bias)) + 1e-30;
        }
    }

    void backward(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& dy)
    {
        dx.assign(static_cast<std::size_t>(numel(xs)), 0.0);
        dw.assign(w.size(), 0.0);
        db.assign(static_cast<std::size_t>(cf.out), 0.0);
        std::vector<double> mx(dx.size(), 0.0), mw(dw.size(), 0.0), mb(db.size(), 0.0);
        std::vector<index_t> kx(dx.size(), 0), kw(dw.size(), 0);
        for_each_product([&](index_t yi, index_t xi, index_t wi) {
            dx[xi] += static_cast<double>(dy[yi]) * w[wi];
            mx[xi] += std::abs(static_cast<double>(dy[yi]) * w[wi]);
            ++kx[xi];
            dw[wi] += static_cast<double>(dy[yi]) * x[xi];
            mw[wi] += std::abs(static_cast<double>(dy[yi]) * x[xi]);
            ++kw[wi];
        });
        const index_t S = ys[2] * ys[3] * ys[4];
        for (std::size_t i = 0; i < dy.size(); ++i) {
            db[(i / S) % cf.out] += dy[i];
            mb[(i / S) % cf.out] += std::abs(dy[i]);
        }
        dx_bound.resize(dx.size());
        for (std::size_t i = 0; i < dx.size(); ++i) dx_bound[i] = (kx[i] + 2) * 0x1p-24 * mx[i] + 1e-30;
        dw_bound.resize(dw.size());
        for (std::size_t i = 0; i < dw.size(); ++i) dw_bound[i] = (kw[i] + 2) * 0x1p-24 * mw[i] + 1e-30;
        db_bound.resize(db.size());
        // Summed in double, rounded once to float.
        const double count = static_cast<double>(ys[0] * S);
        for (std::size_t i = 0; i < db.size(); ++i)
            db_bound[i] = 0x1p-24 * std::abs(db[i]) + (count + 2) * 0x1p-53 * mb[i] + 1e-30;
    }
};

/// Float64 reference of Conv3d -> BatchNorm3d -> ReLU: forward (batch or running statistics,
/// running-stat update) and backward, the ReLU mask optionally taken from the output under
/// test (so a mask decision at |pre-activation| ~ rounding does not make the gradients
/// incomparable; the output check covers that decision).
struct chain_reference {
    conv_reference conv;
    std::vector<double> y, pre, xhat, dz, gamma_grad, beta_grad, mean, var, rm, rv;
    std::vector<double> dx, dw, db;

    chain_reference(const conv_config& cf, const sizes5& xs) : conv(cf, xs) {}

    /// Forward (batch_stats: batch statistics and running-stat update) and backward for dy,
    /// with the ReLU mask given (1 where the output is > 0).
    void run(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& b,
             const std::vector<float>& gamma, const std::vector<float>& beta, std::vector<double> run_mean,
             std::vector<double> run_var, bool batch_stats, double eps, double momentum, const std::vector<float>& dy,
             const std::vector<float>* mask_from)
    {
        conv.forward(x, w, b);
        const auto& z = conv.y;
        const auto& ys = conv.ys;
        const index_t C = ys[1], S = ys[2] * ys[3] * ys[4], n = ys[0] * S;
        mean.assign(C, 0.0);
        var.assign(C, 0.0);
        auto ch = [&](std::size_t i) { return static_cast<index_t>(i / S) % C; };
        if (batch_stats) {
            for (std::size_t i = 0; i < z.size(); ++i) mean[ch(i)] += z[i];
            for (auto& m : mean) m /= n;
            for (std::size_t i = 0; i < z.size(); ++i) var[ch(i)] += (z[i] - mean[ch(i)]) * (z[i] - mean[ch(i)]);
            for (auto& v : var) v /= n;
            rm = run_mean;
            rv = run_var;
            for (index_t c = 0; c < C; ++c) {
                rm[c] = (1 - momentum) * rm[c] + momentum * mean[c];
                rv[c] = (1 - momentum) * rv[c] + momentum * var[c] * n / (n - 1);
            }
        } else {
            mean = run_mean;
            var = run_var;
        }
        std::vector<double> invstd(C);
        for (index_t c = 0; c < C; ++c) invstd[c] = 1 / std::sqrt(var[c] + eps);
        y.resize(z.size());
        pre.resize(z.size());
        xhat.resize(z.size());
        for (std::size_t i = 0; i < z.size(); ++i) {
            xhat[i] = (z[i] - mean[ch(i)]) * invstd[ch(i)];
            pre[i] = gamma[ch(i)] * xhat[i] + beta[ch(i)];
            y[i] = pre[i] > 0 ? pre[i] : 0;
        }
        // Backward through ReLU (mask from the implementation under test, see file comment), BN, conv.
        std::vector<double> g(z.size());
        for (std::size_t i = 0; i < z.size(); ++i)
            g[i] = (mask_from ? (*mask_from)[i] > 0 : pre[i] > 0) ? dy[i] : 0.0;
        beta_grad.assign(C, 0.0);
        gamma_grad.assign(C, 0.0);
        for (std::size_t i = 0; i < z.size(); ++i) {
            beta_grad[ch(i)] += g[i];
            gamma_grad[ch(i)] += g[i] * xhat[i];
        }
        dz.resize(z.size());
        for (std::size_t i = 0; i < z.size(); ++i) {
            const index_t c = ch(i);
            dz[i] = batch_stats ? gamma[c] * invstd[c] / n * (n * g[i] - beta_grad[c] - xhat[i] * gamma_grad[c])
                                : g[i] * gamma[c] * invstd[c];
        }
        // Conv backward of dz in double.
        dx.assign(x.size(), 0.0);
        dw.assign(w.size(), 0.0);
        db.assign(C, 0.0);
        conv.for_each_product([&](index_t yi, index_t xi, index_t wi) {
            dx[xi] += dz[yi] * w[wi];
            dw[wi] += dz[yi] * x[xi];
        });
        for (std::size_t i = 0; i < dz.size(); ++i) db[ch(i)] += dz[i];
    }
};

inline double max_abs(const std::vector<double>& v)
{
    double m = 0;
    for (double x : v) m = std::max(m, std::abs(x));
    return m;
}
/// max |got - want| <= tol * scale (default: max|want|).
inline bool close(const std::vector<float>& got, const std::vector<double>& want, double tol, double scale = -1)
{
    if (got.size() != want.size()) return false;
    if (scale < 0) scale = max_abs(want);
    for (std::size_t i = 0; i < got.size(); ++i)
        if (!(std::abs(got[i] - want[i]) <= tol * scale)) return false;
    return true;
}
inline std::vector<double> to_double(std::span<const float> s) { return {s.begin(), s.end()}; }

/// Index of the first element outside its bound, or -1.
inline long first_outside(const std::vector<float>& got, const std::vector<double>& want,
                          const std::vector<double>& bound)
{
    if (got.size() != want.size()) return 0;
    for (std::size_t i = 0; i < got.size(); ++i)
        if (!(std::abs(got[i] - want[i]) <= bound[i])) return static_cast<long>(i);
    return -1;
}
