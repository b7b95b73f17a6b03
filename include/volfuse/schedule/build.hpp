// How this code was built, against what the machine it runs on offers: the vector ISA the
// kernels were compiled for (a TU built without -march runs SSE2 kernels, about 3x slower than
// AVX-512 on this project's machines) and whether OpenMP is there (without it set_num_threads
// cannot add threads).  A query, and a one-time warning on stderr instead of a silent slowdown.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

#include "../core/config.hpp"
#include "../simd/vec.hpp"
#include "cpu.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

struct build_info {
    const char* isa;       ///< the instruction set this code's kernels use ("avx512bw", "avx2_fma", "sse2", ...)
    index_t vector_width;  ///< floats per vector in these kernels
    index_t machine_width; ///< floats per vector this CPU could run (16 with AVX-512, 8 with AVX2)
    bool openmp;           ///< built with OpenMP (-fopenmp): set_num_threads can add threads
    /// What the vector ISA loses on this machine, or empty.
    std::string isa_problem() const
    {
        if (vector_width >= machine_width) return "";
        return "volfuse: this code was compiled for " + std::string(isa) + " (" + std::to_string(vector_width) +
               " floats per vector) but this CPU runs " + std::to_string(machine_width) +
               ": the kernels run several times slower than they could; compile with -march=native (or "
               "-march=x86-64-v4 for AVX-512, x86-64-v3 for AVX2). VOLFUSE_QUIET=1 silences this.\n";
    }
    /// What is lost without OpenMP, or empty.
    std::string openmp_problem() const
    {
        if (openmp) return "";
        return "volfuse: this code was built without OpenMP: it runs on one thread whatever set_num_threads says; "
               "compile and link with -fopenmp (dependency('volfuse'), pkg-config --cflags --libs volfuse and the "
               "CMake target volfuse::volfuse carry it).\n";
    }
    /// Both, or empty when this build runs as fast as the machine allows.
    std::string problems() const { return isa_problem() + openmp_problem(); }
};

/// This build against this machine.
inline build_info this_build() noexcept
{
    const cpu_info& c = host_cpu();
    const index_t machine = c.avx512 ? 16 : c.avx2 ? 8 : 4;
#ifdef _OPENMP
    constexpr bool omp = true;
#else
    constexpr bool omp = false;
#endif
    return {VOLFUSE_STR(VOLFUSE_ISA), simd::width, machine, omp};
}

namespace detail {
/// Prints this_build().isa_problem() once per process (modules call it when they are built;
/// set_num_threads warns about OpenMP itself); the environment variable VOLFUSE_QUIET silences it.
inline void warn_once_about_build()
{
    static const bool done = [] {
        if (std::getenv("VOLFUSE_QUIET") == nullptr)
            if (const std::string p = this_build().isa_problem(); !p.empty()) std::fputs(p.c_str(), stderr);
        return true;
    }();
    (void)done;
}
} // namespace detail

} // namespace volfuse
