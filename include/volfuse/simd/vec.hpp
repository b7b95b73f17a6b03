// SIMD primitives on xsimd 8.1 for the architecture the TU is compiled for, plus
// the pieces 8.1 lacks: float->double widening, partial (tail) loads and stores,
// and an FMA that is a real fused multiply-add whenever the hardware has one.
// Every primitive the kernels use exists per element type (vec<T>, T = float or double):
// a kernel template is written once over T.  The float-only names (fvec, width, dacc) are
// what float-only code (widening, the float halving sum) spells.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <xsimd/xsimd.hpp>

#include "../core/config.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS::simd {

using arch = xsimd::default_arch;
/// The vector of element type T (float or double) on this TU's architecture.
template <class T>
using vec = xsimd::batch<T, arch>;
template <class T>
using mask = typename vec<T>::batch_bool_type;
using fvec = vec<float>;
using dvec = vec<double>;
using fmask = mask<float>;

/// Elements of T per vector (floats: 4 SSE2, 8 AVX2, 16 AVX-512; doubles half as many).
template <class T>
inline constexpr index_t lanes = static_cast<index_t>(vec<T>::size);
/// Floats per vector.
inline constexpr index_t width = lanes<float>;
static_assert(fvec::size == 2 * dvec::size, "a float vector widens to exactly two double vectors");

/// Two double vectors holding the low and high halves of a float vector.
struct dpair {
    dvec lo, hi;
};

/// Exact float -> double widening of all lanes (xsimd 8.1 only has a slow generic path).
inline dpair widen(fvec v) noexcept
{
#if XSIMD_WITH_AVX512F
    // maskz forms throughout: GCC 12's plain cvtps_pd/extract/cast intrinsics start from
    // _mm512_undefined_*, which -Wmaybe-uninitialized reports (a false positive).
    const __m512d r = _mm512_castps_pd(v);
    return {dvec(_mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, r, 0)))),
            dvec(_mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, r, 1))))};
#elif XSIMD_WITH_AVX
    const __m256 r = v;
    return {dvec(_mm256_cvtps_pd(_mm256_castps256_ps128(r))), dvec(_mm256_cvtps_pd(_mm256_extractf128_ps(r, 1)))};
#elif XSIMD_WITH_SSE2
    const __m128 r = v;
    return {dvec(_mm_cvtps_pd(r)), dvec(_mm_cvtps_pd(_mm_movehl_ps(r, r)))};
#else
    alignas(64) float f[fvec::size];
    alignas(64) double d[fvec::size];
    v.store_aligned(f);
    for (std::size_t i = 0; i < fvec::size; ++i) d[i] = f[i];
    return {dvec::load_aligned(d), dvec::load_aligned(d + dvec::size)};
#endif
}

/// a*b + c, rounded once where the ISA has FMA (8.1's avx512f kernel leaves that to
/// the compiler's contraction, so call the intrinsic), twice on plain SSE2.
/// The same expression in forward and backward therefore gives the same bits.
template <class T>
inline vec<T> fused_multiply_add(vec<T> a, vec<T> b, vec<T> c) noexcept
{
#if XSIMD_WITH_AVX512F
    if constexpr (std::is_same_v<T, float>) return vec<T>(_mm512_fmadd_ps(a, b, c));
    else return vec<T>(_mm512_fmadd_pd(a, b, c));
#else
    return xsimd::fma(a, b, c);
#endif
}
/// c - a*b, rounded once where the ISA has FMA.
template <class T>
inline vec<T> fused_negated_multiply_add(vec<T> a, vec<T> b, vec<T> c) noexcept
{
#if XSIMD_WITH_AVX512F
    if constexpr (std::is_same_v<T, float>) return vec<T>(_mm512_fnmadd_ps(a, b, c));
    else return vec<T>(_mm512_fnmadd_pd(a, b, c));
#else
    return xsimd::fnma(a, b, c);
#endif
}
// Overloads, not a template: callers may pass anything that converts to a vector.
inline fvec fma(fvec a, fvec b, fvec c) noexcept { return fused_multiply_add<float>(a, b, c); }
inline dvec fma(dvec a, dvec b, dvec c) noexcept { return fused_multiply_add<double>(a, b, c); }
inline fvec fnma(fvec a, fvec b, fvec c) noexcept { return fused_negated_multiply_add<float>(a, b, c); }
inline dvec fnma(dvec a, dvec b, dvec c) noexcept { return fused_negated_multiply_add<double>(a, b, c); }
/// fma(a, b, c) in the lanes where `on`, c in the others: AVX-512's masked fma (skipping
/// lanes costs no extra instruction), a select of the fma elsewhere.  Bits as fma's.
inline fvec fma_where(fmask on, fvec a, fvec b, fvec c) noexcept
{
#if XSIMD_WITH_AVX512F && defined(__GNUC__)
    // In assembly: GCC folds the intrinsic into a select, and where c lives in memory (a tile's
    // accumulator array) into a masked store, which keeps the array in memory around the loop.
    __m512 r = c;
    __asm__("vfmadd231ps %2, %1, %0%{%3%}" : "+v"(r) : "v"(__m512(a)), "v"(__m512(b)),
            "Yk"(static_cast<__mmask16>(on)));
    return fvec(r);
#elif XSIMD_WITH_AVX512F
    return fvec(_mm512_mask3_fmadd_ps(a, b, c, static_cast<__mmask16>(on)));
#else
    return xsimd::select(on, fma(a, b, c), c);
#endif
}
/// The same for doubles.
inline dvec fma_where(mask<double> on, dvec a, dvec b, dvec c) noexcept
{
#if XSIMD_WITH_AVX512F
    return dvec(_mm512_mask3_fmadd_pd(a, b, c, static_cast<__mmask8>(on)));
#else
    return xsimd::select(on, fma(a, b, c), c);
#endif
}

template <class T>
inline vec<T> load(const T* p) noexcept { return vec<T>::load_unaligned(p); }
template <class T>
inline void store(T* p, vec<T> v) noexcept { v.store_unaligned(p); }

/// True when p is aligned for store_stream.
template <class T>
inline bool stream_aligned(const T* p) noexcept
{
    return reinterpret_cast<std::uintptr_t>(p) % (sizeof(T) * vec<T>::size) == 0;
}
/// A non-temporal store of a whole vector at a vector-aligned address: the line goes
/// to memory without being read first (no read-for-ownership) and without evicting
/// cached data.  For outputs nobody re-reads soon: an out-of-place pass then moves
/// 8 bytes per element instead of 12.  Needs stream_fence() before others read.
template <class T>
inline void store_stream(T* p, vec<T> v) noexcept
{
    constexpr bool f = std::is_same_v<T, float>;
#if XSIMD_WITH_AVX512F
    if constexpr (f) _mm512_stream_ps(p, v);
    else _mm512_stream_pd(p, v);
#elif XSIMD_WITH_AVX
    if constexpr (f) _mm256_stream_ps(p, v);
    else _mm256_stream_pd(p, v);
#elif XSIMD_WITH_SSE2
    if constexpr (f) _mm_stream_ps(p, v);
    else _mm_stream_pd(p, v);
#else
    (void)f;
    v.store_unaligned(p);
#endif
}
/// Orders this thread's non-temporal stores before its later stores.
inline void stream_fence() noexcept
{
#if XSIMD_WITH_SSE2
    _mm_sfence();
#endif
}

/// Loads the first n (< lanes<T>) elements at p; other lanes are `fill`.  Never reads past p + n.
template <class T>
inline vec<T> load_partial(const T* p, index_t n, T fill = T(0)) noexcept
{
    alignas(64) std::array<T, vec<T>::size> buf;
    buf.fill(fill);
    std::memcpy(buf.data(), p, static_cast<std::size_t>(n) * sizeof(T));
    return vec<T>::load_aligned(buf.data());
}

/// Stores the first n (< lanes<T>) lanes of v at p.  Never writes past p + n.
template <class T>
inline void store_partial(T* p, vec<T> v, index_t n) noexcept
{
    alignas(64) std::array<T, vec<T>::size> buf;
    v.store_aligned(buf.data());
    std::memcpy(p, buf.data(), static_cast<std::size_t>(n) * sizeof(T));
}

/// Lanes [0, n) set.
template <class T = float>
inline mask<T> first_lanes(index_t n) noexcept
{
    alignas(64) std::array<T, vec<T>::size> idx;
    for (std::size_t i = 0; i < vec<T>::size; ++i) idx[i] = static_cast<T>(i);
    return vec<T>::load_aligned(idx.data()) < vec<T>(static_cast<T>(n));
}

/// v's lanes summed as a halving tree: lane i += lane i + h for h = width / 2, ..., 1, then lane
/// 0.  On x86 each level is one add of the vector's two halves (the same bits as the scalar
/// tree, an eighth of the instructions: the narrow grad input sums one vector per element).
inline float halving_sum(fvec v) noexcept
{
#if XSIMD_WITH_AVX512F
    const __m512d r = _mm512_castps_pd(v); // maskz extracts: see widen()
    const __m256 a = _mm256_add_ps(_mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, r, 0)),
                                   _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, r, 1)));
#elif XSIMD_WITH_AVX
    const __m256 a = v;
#endif
#if XSIMD_WITH_AVX
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
#elif XSIMD_WITH_SSE2
    const __m128 b = v;
#endif
#if XSIMD_WITH_SSE2
    const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
#else
    alignas(64) std::array<float, fvec::size> l;
    v.store_aligned(l.data());
    for (std::size_t h = fvec::size / 2; h >= 1; h /= 2)
        for (std::size_t i = 0; i < h; ++i) l[i] += l[i + h];
    return l[0];
#endif
}

/// The same tree over a double vector's lanes.
inline double halving_sum(dvec v) noexcept
{
    alignas(64) std::array<double, dvec::size> l;
    v.store_aligned(l.data());
    for (std::size_t h = dvec::size / 2; h >= 1; h /= 2)
        for (std::size_t i = 0; i < h; ++i) l[i] += l[i + h];
    return l[0];
}

/// v, rounded here: the compiler cannot see through the empty asm, so a product passed through
/// it is never contracted into a later add (GCC contracts a*b + c into an FMA in C++ by default,
/// and whether it does depends on inlining: the same sum would get different bits in
/// different instantiations).  Free: no instruction is emitted.
template <class T>
inline vec<T> rounded(vec<T> v) noexcept
{
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    typename vec<T>::register_type r = v;
    __asm__("" : "+v"(r));
    return vec<T>(r);
#else
    return v;
#endif
}

/// Double-precision accumulator of float vectors: each lane widened exactly, summed in double.
struct dacc {
    dvec lo = dvec::broadcast(0.0), hi = dvec::broadcast(0.0);
    void add(fvec v) noexcept
    {
        const dpair p = widen(v);
        lo += p.lo;
        hi += p.hi;
    }
    /// mem[l] += lane l of v, l in [0, width): an accumulator kept in memory.
    static void add_to(double* mem, fvec v) noexcept
    {
        const dpair w = widen(v);
        (dvec::load_unaligned(mem) + w.lo).store_unaligned(mem);
        (dvec::load_unaligned(mem + dvec::size) + w.hi).store_unaligned(mem + dvec::size);
    }
    /// The width lane sums to mem[0, width).
    void store(double* mem) const noexcept
    {
        lo.store_unaligned(mem);
        hi.store_unaligned(mem + dvec::size);
    }
    /// Two accumulators (independent chains) combined in a fixed order: lanes of
    /// (a.lo + b.lo) + (a.hi + b.hi), then the lanes left to right.
    static double total(const dacc& a, const dacc& b) noexcept { return lanes_sum((a.lo + b.lo) + (a.hi + b.hi)); }
    /// The accumulated sums (what a blocked_acc hands over at the end).
    const dacc& widened() const noexcept { return *this; }
    /// Horizontal sum, lane 0 first (once per channel: order matters more than speed;
    /// also keeps GCC 12's false -Wmaybe-uninitialized of xsimd's AVX-512 hadd away).
    static double lanes_sum(dvec v) noexcept
    {
        alignas(64) std::array<double, dvec::size> l;
        v.store_aligned(l.data());
        double s = 0.0;
        for (double x : l) s += x;
        return s;
    }
};

/// The accumulator of double vectors, with dacc's interface (nothing to widen).
struct dacc_double {
    dvec v = dvec::broadcast(0.0);
    void add(dvec x) noexcept { v += x; }
    static void add_to(double* mem, dvec x) noexcept { (dvec::load_unaligned(mem) + x).store_unaligned(mem); }
    void store(double* mem) const noexcept { v.store_unaligned(mem); }
    static double total(const dacc_double& a, const dacc_double& b) noexcept { return dacc::lanes_sum(a.v + b.v); }
    const dacc_double& widened() const noexcept { return *this; }
};

/// The double accumulator of vec<T>'s lanes.
template <class T>
using wide_acc = std::conditional_t<std::is_same_v<T, float>, dacc, dacc_double>;

/// A float accumulator handed to a double one every `Run` additions: the hot loop adds in
/// float (one instruction per term, no widening), and no float sum ever spans more than Run
/// terms, so its relative rounding error stays below Run * 2^-24 (about Run^0.5 * 2^-24 for
/// random signs) before the double sum takes over.  What the fast batch statistics accumulate in.
template <int Run>
struct blocked_acc {
    fvec f = fvec(0.f);
    int n = 0;
    dacc d;
    void add(fvec v) noexcept
    {
        f += v;
        if (++n == Run) {
            d.add(f);
            f = fvec(0.f);
            n = 0;
        }
    }
    dacc widened() const noexcept
    {
        dacc r = d;
        r.add(f);
        return r;
    }
};

} // namespace volfuse::simd
