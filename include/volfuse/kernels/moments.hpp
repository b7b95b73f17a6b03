// Per-channel moments (count, mean, M2 = sum of squared deviations from the mean) and the two
// operations every batch-statistics composition needs: Chan's merge, which combines two sets'
// moments without the cancellation of E[x^2] - E[x]^2, and the conversion to ATen's var_sum
// (deviations from the float-rounded mean) that the finalization takes.  Written once, for
// scalars and for double vectors (the conv epilogue merges lane by lane).
#pragma once

#include "../core/config.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS::kernels {

/// (na, ma, m2a) += (nb, mb, m2b): Chan et al.'s pairwise update.  T: double or a double vector.
/// An empty side (count 0) leaves the other unchanged; both empty stay empty.
template <class T>
inline void chan_merge(T& na, T& ma, T& m2a, T nb, T mb, T m2b) noexcept
{
    const T n = na + nb, delta = mb - ma;
    ma = ma + delta * (nb / n);
    m2a = m2a + m2b + delta * delta * (na * nb / n);
    na = n;
}

/// The scalar form, skipping empty sides (0/0 would make NaN).
inline void chan_merge_scalar(double& na, double& ma, double& m2a, double nb, double mb, double m2b) noexcept
{
    if (nb == 0) return;
    if (na == 0) {
        na = nb, ma = mb, m2a = m2b;
        return;
    }
    chan_merge(na, ma, m2a, nb, mb, m2b);
}

/// ATen's var_sum: squared deviations from T(mean), M2 + n (mean - T(mean))^2 (M2 for double).
template <class T>
inline double var_sum_about_rounded_mean(double n, double mean, double m2) noexcept
{
    const double d = mean - static_cast<double>(static_cast<T>(mean));
    return m2 + n * d * d;
}

} // namespace volfuse::kernels
