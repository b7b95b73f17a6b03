// Threads: OpenMP when the translation unit is compiled with it (-fopenmp; meson's
// dependency('openmp') adds it), sequential otherwise.  Work is split so that results
// never depend on the thread count: channels are independent, and reductions over
// pixels use fixed blocks combined in block order (a fixed reduction tree).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../core/config.hpp"
#include "../core/error.hpp"

// The requested thread count is one setting of the process, whatever ISA a TU is built for
// (outside the ISA namespace, core/config.hpp).
namespace volfuse::threads_shared {
inline std::atomic<int> requested_threads{0}; // 0: OpenMP's default
} // namespace volfuse::threads_shared

namespace volfuse::inline VOLFUSE_ISA_NS {

/// Threads volfuse's kernels use (torch.set_num_threads's counterpart).  Built without
/// OpenMP, more than one is a no-op, said once on stderr (VOLFUSE_QUIET=1 silences it).
inline void set_num_threads(int n)
{
    if (n < 1) throw error("set_num_threads: expected a positive number of threads, got " + std::to_string(n));
    threads_shared::requested_threads = n;
#ifndef _OPENMP
    if (n > 1) {
        static const bool warned = [] {
            if (std::getenv("VOLFUSE_QUIET") == nullptr)
                std::fputs("volfuse: set_num_threads(n > 1) has no effect: this code was built without OpenMP; "
                           "compile and link with -fopenmp (dependency('volfuse'), pkg-config --cflags --libs "
                           "volfuse and the CMake target volfuse::volfuse carry it).\n",
                           stderr);
            return true;
        }();
        (void)warned;
    }
#endif
}

/// The thread count kernels will use: the last set_num_threads, else OpenMP's default;
/// 1 when compiled without OpenMP.
inline int get_num_threads() noexcept
{
#ifdef _OPENMP
    const int n = threads_shared::requested_threads;
    return n > 0 ? n : omp_get_max_threads();
#else
    return 1;
#endif
}

namespace parallel {

/// Below this many elements touched, a loop stays on one thread (a fork costs ~microseconds).
inline constexpr index_t min_parallel_elements = index_t{1} << 16;

/// body(i) for i in [0, n), statically split over the threads when `elements` (the
/// work's size) is worth it; sequential inside an enclosing parallel region.
template <class F>
void parallel_for(index_t n, index_t elements, F&& body) noexcept
{
#ifdef _OPENMP
    const int threads = elements >= min_parallel_elements && !omp_in_parallel()
                            ? static_cast<int>(std::min<index_t>(get_num_threads(), n))
                            : 1;
    if (threads > 1) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (index_t i = 0; i < n; ++i) body(i);
        return;
    }
#else
    (void)elements;
#endif
    for (index_t i = 0; i < n; ++i) body(i);
}

} // namespace parallel
} // namespace volfuse
