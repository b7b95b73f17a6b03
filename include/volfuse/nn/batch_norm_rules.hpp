// PyTorch 1.13's per-channel scalar rules for batch norm, with its exact float /
// double conversion points (shared/SEMANTICS.md §4-§6).  Written over the element type T:
// ATen's float32 kernel rounds to float where T appears; with T = double the same formulas
// are ATen's float64 kernel (every step in double).  Every operation whose
// rounding matters is a separate, materialized step: a compiler contracting
// `a*b + c` into an FMA here would change the bits ATen produces.
#pragma once

#include <cmath>

#include "../core/config.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS::nn::rules {

/// Forces v to be rounded to its type here (blocks FP contraction across it).
template <class T>
inline T rounded(T v) noexcept
{
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __asm__("" : "+x"(v));
    return v;
#else
    volatile T r = v;
    return r;
#endif
}

/// Training invstd: T(1 / sqrt(double(T(var_sum / n)) + eps)), 0 when the
/// variance and eps are both 0 (ATen's InvStd).
template <class T>
inline T train_invstd(T var_sum, index_t n, double eps) noexcept
{
    const double var = rounded(var_sum / static_cast<T>(n));
    if (var == 0.0 && eps == 0.0) return T(0);
    return static_cast<T>(1.0 / std::sqrt(var + eps));
}

/// Inference invstd: T arithmetic with eps cast to T; no zero guard.
template <class T>
inline T eval_invstd(T running_var, double eps) noexcept
{
    return T(1) / std::sqrt(rounded(running_var + static_cast<T>(eps)));
}

/// The invstd ATen's backward uses with running statistics (computed in double).
template <class T>
inline T eval_backward_invstd(T running_var, double eps) noexcept
{
    return static_cast<T>(1.0 / std::sqrt(static_cast<double>(running_var) + eps));
}

/// The per-channel scale: alpha = T(invstd * gamma), as ATen.
template <class T>
inline T scale(T invstd, T gamma) noexcept { return rounded(invstd * gamma); }

/// running_mean = m*mean + (1-m)*running_mean, all T, no FMA.
template <class T>
inline T update_running_mean(T running_mean, T mean, T m) noexcept
{
    return rounded(rounded(m * mean) + rounded(rounded(T(1) - m) * running_mean));
}

/// running_var = m*unbiased + (1-m)*running_var, unbiased = T(var_sum / (n-1))
/// widened to double, the old term rounded in T first.
template <class T>
inline T update_running_var(T running_var, T var_sum, index_t n, T m) noexcept
{
    const double unbiased = rounded(var_sum / static_cast<T>(n - 1));
    const double old = rounded(rounded(T(1) - m) * running_var);
    return static_cast<T>(rounded(static_cast<double>(m) * unbiased) + old);
}

} // namespace volfuse::nn::rules
