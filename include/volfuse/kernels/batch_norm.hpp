// Batch-norm kernels: training forward (statistics + normalize + epilogue),
// normalize-only (inference), and backward.  The statistics arithmetic, which
// matches ATen bit for bit, is spelled out here; the per-channel scalar rules
// (running statistics, invstd) are callbacks supplied by the module.
//
// Traffic per element (fp32): training forward reads x three times (sum, squared
// deviations, normalize) and writes y once; for NCDHW the three reads of a
// channel run back to back, so the 2nd and 3rd hit cache when a channel's slice
// fits in L2/L3.  Inference: one read, one write.  Backward: reads x and dy
// twice (reductions, then dx), writes dx once.
#pragma once

#include "../core/config.hpp"

#include "../expr/pointwise.hpp"
#include "channel_loops.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS::kernels {

/// Per-channel normalization coefficients, one float each per channel.
/// The mean is carried as hi + lo: hi is ATen's float mean (statistics and
/// running_mean are computed from it, bit for bit), lo = float(mean_double - hi)
/// is what rounding to float lost.  (x - hi) is exact for x near the mean, so
/// the output keeps full accuracy even when |mean| >> std.
struct bn_coeffs {
    const float* mean;    // hi
    const float* mean_lo; // lo (0 with running statistics)
    const float* alpha;   // invstd * gamma
    const float* beta;    // bias
};

/// The same arrays, writable: what the training forward fills in.
struct bn_coeffs_out {
    float *mean, *mean_lo, *alpha, *beta;
    operator bn_coeffs() const noexcept { return {mean, mean_lo, alpha, beta}; }
};

/// The batch-norm output before the epilogue: ((x - hi) - lo) * alpha + beta, the
/// product and sum rounded once.  ATen computes x * alpha + (beta - mean * alpha),
/// which cancels catastrophically when |mean| >> std (a constant channel of 1e7
/// comes out as +-100 instead of beta: pytorch#5410).
inline fvec centered(fvec x, fvec hi, fvec lo) noexcept { return (x - hi) - lo; }

/// y = epi(((x - hi) - lo) * alpha + beta).
template <class Form, class Epi>
void normalize(const Form& f, index_t c0, index_t c1, const float* x, float* y, const bn_coeffs& k, Epi epi) noexcept
{
    transform_channels<1, 4>(f, c0, c1, srcs<1>{x}, srcs<4>{k.mean, k.mean_lo, k.alpha, k.beta}, y,
                             [epi](const fvecs<1>& v, const fvecs<4>& p) {
                                 return epi(simd::fma(centered(v[0], p[0], p[1]), p[2], p[3]));
                             });
}

/// Per-channel batch statistics, then normalize, channel group by channel group.
/// `finalize(c, mean_f, var_sum_f, alpha&, beta&)` turns a channel's statistics
/// into its scale and shift (and updates running statistics).
/// ATen's rounding: mean = float(double sum / n); var_sum = double sum of
/// float((x - mean_f)^2): the mean is rounded to float before the second pass.
/// work: reduce_workspace(f, 1) doubles; k's arrays: C floats each, written here.
template <class Form, class Finalize, class Epi>
void batch_norm_train(const Form& f, const float* x, float* y, const bn_coeffs_out& k, double* work,
                      Finalize&& finalize, Epi epi) noexcept
{
    const index_t stride = reduce_stride(value_of(f.channels));
    const double n = static_cast<double>(f.count());
    for_channel_groups(f, [&](index_t c0, index_t c1) {
        reduce_channels<1, 1, 0>(f, c0, c1, srcs<1>{x}, srcs<0>{}, [](const fvecs<1>& v, const fvecs<0>&) { return v; },
                                 work, stride);
        for (index_t c = c0; c < c1; ++c) {
            const double m = work[c] / n;
            k.mean[c] = static_cast<float>(m);
            k.mean_lo[c] = static_cast<float>(m - k.mean[c]);
        }
        reduce_channels<1, 1, 1>(
            f, c0, c1, srcs<1>{x}, srcs<1>{k.mean},
            [](const fvecs<1>& v, const fvecs<1>& p) {
                const fvec d = v[0] - p[0];
                return fvecs<1>{d * d}; // rounded to float, then summed in double (as ATen)
            },
            work, stride);
        for (index_t c = c0; c < c1; ++c)
            finalize(c, k.mean[c], static_cast<float>(work[c]), k.alpha[c], k.beta[c]);
        normalize(f, c0, c1, x, y, k, epi);
    });
}

/// Coefficients the backward kernel reads, one float per channel each.
struct bn_backward_coeffs {
    bn_coeffs fwd;       // the forward's coefficients: the pre-activation is recomputed
                         // bit-exactly from x, so the ReLU mask needs no storage
    const float* invstd; // invstd backward scales by (eval: computed in double, as ATen)
    const float* gamma;  // weight at forward time (1 without affine)
    float* grad_mean;    // written by finalize: sum(dy')/n   (batch statistics only)
    float* k;            // written by finalize: dotp*invstd^2/n (batch statistics only)
};

/// Backward through epi(batch_norm(x)).  Pass 1 reduces, per channel,
/// sum(dy') and dotp = sum((x - mean) * dy') in double, where dy' = epi.grad(dy);
/// `finalize(c, sum, dotp)` accumulates parameter grads and sets grad_mean/k.
/// Pass 2: dx = ((dy' - grad_mean) - (x - mean) * k) * invstd * gamma with batch
/// statistics, dx = dy' * invstd * gamma with running statistics.
/// dx may be the same memory as dy or x.
template <bool BatchStats, class Form, class Finalize, class Epi>
void batch_norm_backward(const Form& f, const float* x, const float* dy, float* dx, const bn_backward_coeffs& cf,
                         double* work, Finalize&& finalize, Epi epi) noexcept
{
    const index_t stride = reduce_stride(value_of(f.channels));
    for_channel_groups(f, [&](index_t c0, index_t c1) {
        reduce_channels<2, 2, 4>(
            f, c0, c1, srcs<2>{x, dy}, srcs<4>{cf.fwd.mean, cf.fwd.mean_lo, cf.fwd.alpha, cf.fwd.beta},
            [epi](const fvecs<2>& v, const fvecs<4>& p) {
                const fvec xm = centered(v[0], p[0], p[1]);
                const fvec g = epi.grad(simd::fma(xm, p[2], p[3]), v[1]);
                return fvecs<2>{g, xm * g};
            },
            work, stride);
        for (index_t c = c0; c < c1; ++c) finalize(c, work[c], work[stride + c]);
        transform_channels<2, 8>(
            f, c0, c1, srcs<2>{x, dy},
            srcs<8>{cf.fwd.mean, cf.fwd.mean_lo, cf.fwd.alpha, cf.fwd.beta, cf.grad_mean, cf.k, cf.invstd, cf.gamma},
            dx, [epi](const fvecs<2>& v, const fvecs<8>& p) {
                const fvec xm = centered(v[0], p[0], p[1]);
                fvec t = epi.grad(simd::fma(xm, p[2], p[3]), v[1]);
                if constexpr (BatchStats) t = simd::fnma(xm, p[5], t - p[4]);
                return (t * p[6]) * p[7];
            });
    });
}

} // namespace volfuse::kernels
