// PyTorch 1.13's per-channel scalar rules for batch norm, with its exact float /
// double conversion points (shared/SEMANTICS.md §4-§6).  Every operation whose
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

/// Training invstd: float(1 / sqrt(double(float(var_sum / n)) + eps)), 0 when the
/// variance and eps are both 0 (ATen's InvStd).
inline float train_invstd(float var_sum, index_t n, double eps) noexcept
{
    const double var = rounded(var_sum / static_cast<float>(n));
    if (var == 0.0 && eps == 0.0) return 0.f;
    return static_cast<float>(1.0 / std::sqrt(var + eps));
}

/// Inference invstd: float arithmetic with eps cast to float; no zero guard.
inline float eval_invstd(float running_var, double eps) noexcept
{
    return 1.f / std::sqrt(rounded(running_var + static_cast<float>(eps)));
}

/// The invstd ATen's backward uses with running statistics (computed in double).
inline float eval_backward_invstd(float running_var, double eps) noexcept
{
    return static_cast<float>(1.0 / std::sqrt(static_cast<double>(running_var) + eps));
}

/// The per-channel scale: alpha = float(invstd * gamma), as ATen.
inline float scale(float invstd, float gamma) noexcept { return rounded(invstd * gamma); }

/// running_mean = m*mean + (1-m)*running_mean, all float, no FMA.
inline float update_running_mean(float running_mean, float mean, float m) noexcept
{
    return rounded(rounded(m * mean) + rounded(rounded(1.f - m) * running_mean));
}

/// running_var = m*unbiased + (1-m)*running_var, unbiased = float(var_sum / (n-1))
/// widened to double, the old term rounded in float first.
inline float update_running_var(float running_var, float var_sum, index_t n, float m) noexcept
{
    const double unbiased = rounded(var_sum / static_cast<float>(n - 1));
    const double old = rounded(rounded(1.f - m) * running_var);
    return static_cast<float>(rounded(static_cast<double>(m) * unbiased) + old);
}

} // namespace volfuse::nn::rules
