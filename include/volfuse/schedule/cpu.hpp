// The CPU the process runs on, as the schedule tables need it: vendor, family, model and the
// microarchitecture class whose defaults apply.  Read once with CPUID (x86-64); AVX-512 counts
// only when the OS saves the zmm state (XCR0), as the kernels need.
#pragma once

#include "../core/config.hpp"

#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace volfuse::inline VOLFUSE_ISA_NS {

/// Microarchitecture classes with their own schedule defaults.
enum class uarch {
    baseline,     ///< x86-64 without AVX2 (or not x86)
    avx2,         ///< AVX2 + FMA, no AVX-512 (Zen 2/3, Intel client cores)
    intel_avx512, ///< Intel cores with AVX-512 (two 512-bit FMA ports on server parts)
    zen4,         ///< AMD Zen 4: AVX-512 executed as two 256-bit halves
    zen5,         ///< AMD Zen 5: full-width 512-bit datapaths
};

inline const char* uarch_name(uarch u) noexcept
{
    switch (u) {
    case uarch::baseline: return "baseline";
    case uarch::avx2: return "avx2";
    case uarch::intel_avx512: return "intel_avx512";
    case uarch::zen4: return "zen4";
    case uarch::zen5: return "zen5";
    }
    return "?";
}

struct cpu_info {
    std::string vendor; // "GenuineIntel", "AuthenticAMD", ...
    int family = 0, model = 0;
    bool avx2 = false, avx512 = false; // usable: CPU and OS support
    uarch arch = uarch::baseline;

    /// "intel_avx512 (GenuineIntel family 6 model 207)".
    std::string str() const
    {
        std::string s = uarch_name(arch);
        s += " (";
        s += vendor.empty() ? "unknown vendor" : vendor;
        s += " family ";
        s += std::to_string(family);
        s += " model ";
        s += std::to_string(model);
        s += ")";
        return s;
    }
};

/// The class a (vendor, family, AVX2, AVX-512) combination falls in.  AMD family 0x19 with
/// AVX-512 is Zen 4 (Zen 3 shares the family but has no AVX-512); family 0x1A is Zen 5.
constexpr uarch classify(bool amd, bool intel, int family, bool avx2, bool avx512) noexcept
{
    if (avx512) {
        if (amd && family == 0x1A) return uarch::zen5;
        if (amd && family == 0x19) return uarch::zen4;
        if (amd && family > 0x1A) return uarch::zen5; // newer AMD: the nearest known
        (void)intel;
        return uarch::intel_avx512;
    }
    return avx2 ? uarch::avx2 : uarch::baseline;
}

namespace detail {
inline cpu_info detect_cpu() noexcept
{
    cpu_info c;
#if defined(__x86_64__) || defined(__i386__)
    unsigned a = 0, b = 0, cx = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &cx, &d)) return c;
    const unsigned max_leaf = a;
    char v[13] = {};
    __builtin_memcpy(v, &b, 4);
    __builtin_memcpy(v + 4, &d, 4);
    __builtin_memcpy(v + 8, &cx, 4);
    c.vendor = v;
    __get_cpuid(1, &a, &b, &cx, &d);
    const int base_family = static_cast<int>((a >> 8) & 0xF), base_model = static_cast<int>((a >> 4) & 0xF);
    c.family = base_family == 0xF ? base_family + static_cast<int>((a >> 20) & 0xFF) : base_family;
    c.model = base_family == 0xF || base_family == 6 ? base_model + (static_cast<int>((a >> 16) & 0xF) << 4)
                                                      : base_model;
    const bool osxsave = (cx >> 27) & 1, fma = (cx >> 12) & 1;
    unsigned xcr0 = 0;
    if (osxsave) {
        unsigned hi = 0;
        __asm__ volatile("xgetbv" : "=a"(xcr0), "=d"(hi) : "c"(0));
    }
    const bool ymm = (xcr0 & 0x6) == 0x6, zmm = (xcr0 & 0xE6) == 0xE6;
    if (max_leaf >= 7) {
        __get_cpuid_count(7, 0, &a, &b, &cx, &d);
        c.avx2 = ymm && fma && ((b >> 5) & 1);
        c.avx512 = zmm && c.avx2 && ((b >> 16) & 1); // AVX512F
    }
#endif
    c.arch = classify(c.vendor == "AuthenticAMD", c.vendor == "GenuineIntel", c.family, c.avx2, c.avx512);
    return c;
}
} // namespace detail

/// The CPU this process runs on (detected once).
inline const cpu_info& host_cpu() noexcept
{
    static const cpu_info c = detail::detect_cpu();
    return c;
}

} // namespace volfuse
