// Batch-norm kernels as phases, which BatchNorm3d, the fused block and SyncBatchNorm3d
// compose (the evaluator and the modules decide what runs between them):
//   forward:  statistics per channel (moments(): count, mean, M2, mergeable; or
//             aten_statistics(): ATen's bits) -> [merge across processes] -> finalize (the
//             module's rules) -> normalize (+ epilogue);
//   backward: backward_reduce (sum dy', sum (x - mean) dy') -> [merge] -> finalize ->
//             backward_elementwise.
// batch_norm_train / batch_norm_backward are the one-process compositions, group by group.
//
// Every kernel is one template over the element type T (float or double, deduced from the
// pointers); the statistics and backward sums are double either way.
//
// Traffic per element (fp32), policy fast: the training forward reads x once for the
// moments and once to normalize (from cache: a channel-major channel's or a 16-channel
// block's slice is normalized right after its moments) and writes y once; policy aten reads
// x three times (two statistics passes).  Inference: one read, one write.  Backward: reads
// x and dy twice (reductions, then dx, the second from cache group by group), writes dx once.
#pragma once

#include "../core/config.hpp"

#include <type_traits>

#include "../expr/pointwise.hpp"
#include "channel_loops.hpp"
#include "moments.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS::kernels {

/// Per-channel normalization coefficients, one T each per channel.
/// The mean is carried as hi + lo: hi is ATen's mean rounded to T (statistics and
/// running_mean are computed from it, bit for bit), lo = T(mean_double - hi)
/// is what rounding to T lost (0 for double).  (x - hi) is exact for x near the mean, so
/// the output keeps full accuracy even when |mean| >> std.
template <class T = float>
struct bn_coeffs {
    const T* mean;    // hi
    const T* mean_lo; // lo (0 with running statistics)
    const T* alpha;   // invstd * gamma
    const T* beta;    // bias
};

/// The same arrays, writable: what the training forward fills in.
template <class T = float>
struct bn_coeffs_out {
    T *mean, *mean_lo, *alpha, *beta;
    operator bn_coeffs<T>() const noexcept { return {mean, mean_lo, alpha, beta}; }
};
/// The kernels' coefficient parameter: T is deduced from the data pointers alone (so that a
/// bn_coeffs_out converts).
template <class T>
using coeffs_arg = bn_coeffs<std::type_identity_t<T>>;

/// The batch-norm output before the epilogue: ((x - hi) - lo) * alpha + beta, the
/// product and sum rounded once.  ATen computes x * alpha + (beta - mean * alpha),
/// which cancels catastrophically when |mean| >> std (a constant channel of 1e7
/// comes out as +-100 instead of beta: pytorch#5410).
template <class V>
inline V centered(V x, V hi, V lo) noexcept { return (x - hi) - lo; }

/// y = epi(((x - hi) - lo) * alpha + beta).
template <class Form, class T, class Epi>
void normalize(const Form& f, index_t c0, index_t c1, const T* x, T* y, const coeffs_arg<T>& k, Epi epi) noexcept
{
    transform_channels<1, 4>(f, c0, c1, srcs<1, T>{x}, srcs<4, T>{k.mean, k.mean_lo, k.alpha, k.beta}, y,
                             [epi](const vecs<1, T>& v, const vecs<4, T>& p) {
                                 return epi(simd::fma(centered(v[0], p[0], p[1]), p[2], p[3]));
                             });
}

/// How batch statistics are summed (a module option: BatchNorm3d::set_stats_policy).
///   fast: one read of x.  Per channel, S1 = sum x widened to double term by term (exact
///         per term: the mean must be right to double precision, since the output carries it
///         as a float hi + lo pair) and S2 = sum (x - s)^2 around a shift s (the channel's
///         first element), in float runs of `stats_run` terms per lane, the runs in double
///         (channel-minor forms: widened term by term too, so that static and dynamic C keep
///         identical bits); mean = S1/n, M2 = S2 - n (mean - s)^2.  Mergeable (moments()), so
///         it is also what SyncBatchNorm3d gathers.  M2's relative error is about
///         (1 + ((s - mean)/std)^2) * 2^-24 * a few: a float rounding of the variance.
///   aten: ATen's order and rounding, bit for bit (two passes widened to double: the sum,
///         then float((x - float(mean))^2)); its running statistics equal PyTorch's bits.
/// Double data is summed in double term by term under either policy.
enum class batch_stats_policy { fast, aten };

/// Float terms per lane before a run is added in double (simd::blocked_acc).
inline constexpr int stats_run = 32;
/// The fast policy's accumulation of (S1, S2) (channel-minor forms: see batch_stats_policy).
template <class Form>
using fast_moments = std::conditional_t<Form::channel_minor, all_double, accumulation<1, stats_run>>;

/// Offset of channel c's first element (outer 0, inner 0) in a form's data.
template <class Form>
constexpr index_t first_offset(const Form& f, index_t c) noexcept
{
    if constexpr (Form::blocked) return (c / Form::block) * value_of(f.inner) * Form::block + c % Form::block;
    else return c * value_of(f.inner);
}

/// Per-channel statistics of channels [c0, c1) as arrays (C each).
template <class T = float>
struct moments_out {
    T* shift; // scratch: the channel's shift
    double* mean;
    double* m2; // moments(): sum of squared deviations from mean; statistics(): from float(mean)
};

/// Phase 1 (mergeable): per channel of [c0, c1), mean and M2 of x in one read (policy fast).
/// work: reduce_workspace(f, 2) doubles.  Channel-minor forms cover [0, C) in parallel over
/// pixel blocks; other forms run [c0, c1) on the calling thread.
template <class Form, class T>
void moments(const Form& f, index_t c0, index_t c1, const T* x, double* work, const moments_out<T>& m) noexcept
{
    const index_t stride = reduce_stride(value_of(f.channels));
    if constexpr (Form::channel_minor) c0 = 0, c1 = value_of(f.channels);
    for (index_t c = c0; c < c1; ++c) m.shift[c] = x[first_offset(f, c)];
    reduce_channels<2, 1, 1, fast_moments<Form>>(
        f, c0, c1, srcs<1, T>{x}, srcs<1, T>{m.shift},
        [](const vecs<1, T>& v, const vecs<1, T>& p) {
            const simd::vec<T> d = v[0] - p[0];
            return vecs<2, T>{v[0], simd::rounded(d * d)};
        },
        work, stride);
    const double n = static_cast<double>(f.count());
    for (index_t c = c0; c < c1; ++c) {
        const double mean = work[c] / n, d = mean - static_cast<double>(m.shift[c]);
        const double m2 = work[stride + c] - n * d * d;
        m.mean[c] = mean;
        m.m2[c] = m2 < 0 ? 0 : m2; // rounding can take an exactly constant channel's M2 below 0
    }
}

/// Phase 1, ATen's way (policy aten): mean = sum / n in double, m2 = ATen's var_sum, the double
/// sum of T((x - T(mean))^2).  Not mergeable: local statistics only.
template <class Form, class T>
void aten_statistics(const Form& f, index_t c0, index_t c1, const T* x, double* work, const moments_out<T>& m) noexcept
{
    const index_t stride = reduce_stride(value_of(f.channels));
    if constexpr (Form::channel_minor) c0 = 0, c1 = value_of(f.channels);
    const double n = static_cast<double>(f.count());
    reduce_channels<1, 1, 0>(f, c0, c1, srcs<1, T>{x}, srcs<0, T>{},
                             [](const vecs<1, T>& v, const vecs<0, T>&) { return v; }, work, stride);
    for (index_t c = c0; c < c1; ++c) {
        m.mean[c] = work[c] / n;
        m.shift[c] = static_cast<T>(m.mean[c]);
    }
    reduce_channels<1, 1, 1>(
        f, c0, c1, srcs<1, T>{x}, srcs<1, T>{m.shift},
        [](const vecs<1, T>& v, const vecs<1, T>& p) {
            const simd::vec<T> d = v[0] - p[0];
            return vecs<1, T>{d * d}; // rounded to T, then summed in double (as ATen)
        },
        work, stride);
    for (index_t c = c0; c < c1; ++c) m.m2[c] = work[c];
}

/// The channel-major walk (channel_loops.hpp: two slots, then the tails) over channels cn and c
/// at once: visit(offset in cn, offset in c, lanes, slot).  Pipelined phases run on it, so
/// channel cn's sums take the same path as in the unpipelined reduction.
template <class T, class Form, class Visit>
void walk_two_channels(const Form& f, index_t cn, index_t c, Visit&& visit) noexcept
{
    constexpr index_t width = simd::lanes<T>;
    const index_t C = value_of(f.channels), I = value_of(f.inner), O = value_of(f.outer);
    for (index_t o = 0; o < O; ++o) {
        const index_t bn = (o * C + cn) * I, bc = (o * C + c) * I;
        index_t i = 0;
        for (; i + 2 * width <= I; i += 2 * width) {
            visit(bn + i, bc + i, width, slot<0>{});
            visit(bn + i + width, bc + i + width, width, slot<1>{});
        }
        if (i + width <= I) {
            visit(bn + i, bc + i, width, slot<0>{});
            i += width;
        }
        if (i < I) visit(bn + i, bc + i, I - i, slot<1>{});
    }
}

/// Channel-major forms: body(c0, c1) on contiguous channel ranges, one per thread (a pipeline
/// runs along each range; bits do not depend on the split).
template <class Form, class Body>
void for_channel_ranges(const Form& f, Body&& body)
{
    const index_t C = value_of(f.channels);
    const index_t T = std::min<index_t>(
        C, f.count() * C >= parallel::min_parallel_elements ? static_cast<index_t>(get_num_threads()) : 1);
    parallel::parallel_for(T, f.count() * C, [&](index_t t) {
        if (C * t / T < C * (t + 1) / T) body(C * t / T, C * (t + 1) / T);
    });
}

/// Channel-major forms, policy fast: channel cn's moments (a stream from DRAM) accumulated in the
/// same loop that normalizes channel c (its slice still in cache), so that the two passes
/// overlap instead of alternating.  cn's moments get exactly moments()'s bits: the same walk
/// (two slots, the same tails and masks), the same accumulators.
template <class Form, class T, class Epi>
void moments_and_normalize(const Form& f, index_t cn, index_t c, const T* x, T* y, const moments_out<T>& m,
                           const coeffs_arg<T>& k, bool stream, Epi epi) noexcept
{
    static_assert(!Form::channel_minor && !Form::blocked);
    using V = simd::vec<T>;
    m.shift[cn] = x[first_offset(f, cn)];
    const V s(m.shift[cn]), hi(k.mean[c]), lo(k.mean_lo[c]), al(k.alpha[c]), be(k.beta[c]);
    std::array<term_accumulators<2, fast_moments<Form>, T>, 2> acc{};
    auto visit = [&](index_t next, index_t here, index_t lanes, auto slot) {
        const bool full = lanes == simd::lanes<T>;
        const V v = full ? simd::load(x + next) : simd::load_partial(x + next, lanes);
        const V d = v - s;
        V t0 = v, t1 = simd::rounded(d * d); // as moments(): never contracted into the sum
        if (!full) {
            const auto mask = simd::first_lanes<T>(lanes);
            t0 = xsimd::select(mask, t0, V(T(0)));
            t1 = xsimd::select(mask, t1, V(T(0)));
        }
        acc[decltype(slot)::value].add(0, t0);
        acc[decltype(slot)::value].add(1, t1);
        const V u = full ? simd::load(x + here) : simd::load_partial(x + here, lanes);
        const V r = epi(simd::fma(centered(u, hi, lo), al, be));
        store_result(y + here, r, lanes, stream);
    };
    walk_two_channels<T>(f, cn, c, visit);
    if (stream) simd::stream_fence();
    const double n = static_cast<double>(f.count());
    const double s1 = simd::wide_acc<T>::total(acc[0].widened(0), acc[1].widened(0)),
                 s2 = simd::wide_acc<T>::total(acc[0].widened(1), acc[1].widened(1));
    const double mean = s1 / n, dm = mean - static_cast<double>(m.shift[cn]);
    const double m2 = s2 - n * dm * dm;
    m.mean[cn] = mean;
    m.m2[cn] = m2 < 0 ? 0 : m2;
}

/// The training forward of one process: per channel group, statistics (phase 1) ->
/// `finalize(c0, c1)` (phase 3: the module's rules over m.mean / ATen var_sum in m.m2; a
/// local batch needs no merge) -> normalize (phase 4).  A channel's slice is still in cache
/// when it is normalized (channel-major and blocked forms run group by group).
/// work: reduce_workspace(f, 2) doubles; m's arrays and k's: C each.
template <class Form, class T, class Finalize, class Epi>
void batch_norm_train(const Form& f, batch_stats_policy policy, const T* x, T* y, const moments_out<T>& m,
                      const bn_coeffs_out<T>& k, double* work, Finalize&& finalize, Epi epi) noexcept
{
    const double n = static_cast<double>(f.count());
    if constexpr (!Form::channel_minor && !Form::blocked) {
        if (policy == batch_stats_policy::fast) {
            // Pipelined across channels (moments_and_normalize), each thread over a contiguous
            // range of channels; every channel's bits are those of the unpipelined phases.
            const bool stream =
                streams(srcs<1, T>{x}, y, f.count() * value_of(f.channels) * static_cast<index_t>(sizeof(T)));
            for_channel_ranges(f, [&](index_t c0, index_t c1) {
                moments(f, c0, c0 + 1, x, work, m);
                for (index_t c = c0; c < c1; ++c) {
                    m.m2[c] = var_sum_about_rounded_mean<T>(n, m.mean[c], m.m2[c]);
                    finalize(c, c + 1);
                    if (c + 1 < c1) moments_and_normalize(f, c + 1, c, x, y, m, k, stream, epi);
                    else normalize(f, c, c + 1, x, y, k, epi);
                }
            });
            return;
        }
    }
    for_channel_groups(f, [&](index_t c0, index_t c1) {
        if (policy == batch_stats_policy::aten) {
            aten_statistics(f, c0, c1, x, work, m);
        } else {
            moments(f, c0, c1, x, work, m);
            for (index_t c = c0; c < c1; ++c) m.m2[c] = var_sum_about_rounded_mean<T>(n, m.mean[c], m.m2[c]);
        }
        finalize(c0, c1);
        normalize(f, c0, c1, x, y, k, epi);
    });
}

/// Coefficients the backward kernel reads, one T per channel each.
template <class T = float>
struct bn_backward_coeffs {
    bn_coeffs<T> fwd; // the forward's coefficients: the pre-activation is recomputed
                      // bit-exactly from x, so the ReLU mask needs no storage
    const T* invstd;  // invstd backward scales by (eval: computed in double, as ATen)
    const T* gamma;   // weight at forward time (1 without affine)
    T* grad_mean;     // written by finalize: sum(dy')/n   (batch statistics only)
    T* k;             // written by finalize: dotp*invstd^2/n (batch statistics only)
};
template <class T>
using backward_coeffs_arg = bn_backward_coeffs<std::type_identity_t<T>>;

/// Backward phase 1: per channel of [c0, c1), sum(dy') and dotp = sum((x - mean) * dy') in
/// double, dy' = epi.grad(dy) (the epilogue's mask recomputed from x), into work[c] and
/// work[stride + c].  A: all_double (policy aten) or float runs (policy fast: both sums feed
/// terms of dx that are O(dy), so a float rounding of them is below dx's own).
template <class A, class Form, class T, class Epi>
void backward_reduce(const Form& f, index_t c0, index_t c1, const T* x, const T* dy, const coeffs_arg<T>& k,
                     double* work, Epi epi) noexcept
{
    reduce_channels<2, 2, 4, A>(
        f, c0, c1, srcs<2, T>{x, dy}, srcs<4, T>{k.mean, k.mean_lo, k.alpha, k.beta},
        [epi](const vecs<2, T>& v, const vecs<4, T>& p) {
            const simd::vec<T> xm = centered(v[0], p[0], p[1]);
            const simd::vec<T> g = epi.grad(simd::fma(xm, p[2], p[3]), v[1]);
            return vecs<2, T>{g, simd::rounded(xm * g)}; // never contracted into the sum
        },
        work, reduce_stride(value_of(f.channels)));
}

/// Backward phase 1 with the accumulation `policy` asks for.
template <class Form, class T, class Epi>
void backward_sums(const Form& f, batch_stats_policy policy, index_t c0, index_t c1, const T* x, const T* dy,
                   const coeffs_arg<T>& k, double* work, Epi epi) noexcept
{
    if (policy == batch_stats_policy::aten) backward_reduce<all_double>(f, c0, c1, x, dy, k, work, epi);
    else if constexpr (Form::channel_minor) backward_reduce<all_double>(f, c0, c1, x, dy, k, work, epi);
    else backward_reduce<accumulation<0, stats_run>>(f, c0, c1, x, dy, k, work, epi);
}

/// Backward phase 3 (after the sums are merged and finalized into grad_mean and k):
/// dx = ((dy' - grad_mean) - (x - mean) * k) * invstd * gamma with batch statistics,
/// dx = dy' * invstd * gamma with running statistics.  dx may be the same memory as dy or x.
template <bool BatchStats, class Form, class T, class Epi>
void backward_elementwise(const Form& f, index_t c0, index_t c1, const T* x, const T* dy, T* dx,
                          const backward_coeffs_arg<T>& cf, Epi epi) noexcept
{
    transform_channels<2, 8>(
        f, c0, c1, srcs<2, T>{x, dy},
        srcs<8, T>{cf.fwd.mean, cf.fwd.mean_lo, cf.fwd.alpha, cf.fwd.beta, cf.grad_mean, cf.k, cf.invstd, cf.gamma}, dx,
        [epi](const vecs<2, T>& v, const vecs<8, T>& p) {
            const simd::vec<T> xm = centered(v[0], p[0], p[1]);
            simd::vec<T> t = epi.grad(simd::fma(xm, p[2], p[3]), v[1]);
            if constexpr (BatchStats) t = simd::fnma(xm, p[5], t - p[4]);
            return (t * p[6]) * p[7];
        });
}

/// Channel-major forms, policy fast: channel cn's backward sums (streamed from DRAM) accumulated in
/// the same loop that writes channel c's dx (its slices still in cache), as moments_and_normalize
/// does for the forward.  cn's sums get exactly backward_sums()'s bits; written to
/// work[cn] and work[stride + cn].
template <bool BatchStats, class Form, class T, class Epi>
void reduce_and_elementwise(const Form& f, index_t cn, index_t c, const T* x, const T* dy, T* dx,
                            const backward_coeffs_arg<T>& cf, double* work, bool stream, Epi epi) noexcept
{
    static_assert(!Form::channel_minor && !Form::blocked);
    using V = simd::vec<T>;
    const bn_coeffs<T>& k = cf.fwd;
    const V nhi(k.mean[cn]), nlo(k.mean_lo[cn]), nal(k.alpha[cn]), nbe(k.beta[cn]);
    const V hi(k.mean[c]), lo(k.mean_lo[c]), al(k.alpha[c]), be(k.beta[c]), gm(cf.grad_mean[c]), kk(cf.k[c]),
        is(cf.invstd[c]), ga(cf.gamma[c]);
    std::array<term_accumulators<2, accumulation<0, stats_run>, T>, 2> acc{};
    auto visit = [&](index_t next, index_t here, index_t lanes, auto slot) {
        const bool full = lanes == simd::lanes<T>;
        auto load = [&](const T* p) { return full ? simd::load(p) : simd::load_partial(p, lanes); };
        {
            const V xm = centered(load(x + next), nhi, nlo);
            V g = epi.grad(simd::fma(xm, nal, nbe), load(dy + next));
            V gx = simd::rounded(xm * g); // as backward_reduce
            if (!full) {
                const auto mask = simd::first_lanes<T>(lanes);
                g = xsimd::select(mask, g, V(T(0)));
                gx = xsimd::select(mask, gx, V(T(0)));
            }
            acc[decltype(slot)::value].add(0, g);
            acc[decltype(slot)::value].add(1, gx);
        }
        const V xm = centered(load(x + here), hi, lo);
        V t = epi.grad(simd::fma(xm, al, be), load(dy + here));
        if constexpr (BatchStats) t = simd::fnma(xm, kk, t - gm);
        const V r = (t * is) * ga;
        store_result(dx + here, r, lanes, stream);
    };
    walk_two_channels<T>(f, cn, c, visit);
    if (stream) simd::stream_fence();
    const index_t stride = reduce_stride(value_of(f.channels));
    work[cn] = simd::wide_acc<T>::total(acc[0].widened(0), acc[1].widened(0));
    work[stride + cn] = simd::wide_acc<T>::total(acc[0].widened(1), acc[1].widened(1));
}

/// The backward of one process: per channel group, reduce -> `finalize(c, sum, dotp)`
/// (parameter grads, grad_mean and k) -> elementwise, the group's slices still in cache.
/// work: reduce_workspace(f, 2) doubles.
template <bool BatchStats, class Form, class T, class Finalize, class Epi>
void batch_norm_backward(const Form& f, batch_stats_policy policy, const T* x, const T* dy, T* dx,
                         const backward_coeffs_arg<T>& cf, double* work, Finalize&& finalize, Epi epi) noexcept
{
    const index_t stride = reduce_stride(value_of(f.channels));
    if constexpr (!Form::channel_minor && !Form::blocked) {
        if (policy == batch_stats_policy::fast) {
            // Pipelined across channels (reduce_and_elementwise), as batch_norm_train.
            const bool stream =
                streams(srcs<2, T>{x, dy}, dx, f.count() * value_of(f.channels) * static_cast<index_t>(sizeof(T)));
            for_channel_ranges(f, [&](index_t c0, index_t c1) {
                backward_sums(f, policy, c0, c0 + 1, x, dy, cf.fwd, work, epi);
                for (index_t c = c0; c < c1; ++c) {
                    finalize(c, work[c], work[stride + c]);
                    if (c + 1 < c1) reduce_and_elementwise<BatchStats>(f, c + 1, c, x, dy, dx, cf, work, stream, epi);
                    else backward_elementwise<BatchStats>(f, c, c + 1, x, dy, dx, cf, epi);
                }
            });
            return;
        }
    }
    for_channel_groups(f, [&](index_t c0, index_t c1) {
        backward_sums(f, policy, c0, c1, x, dy, cf.fwd, work, epi);
        for (index_t c = c0; c < c1; ++c) finalize(c, work[c], work[stride + c]);
        backward_elementwise<BatchStats>(f, c0, c1, x, dy, dx, cf, epi);
    });
}

} // namespace volfuse::kernels
