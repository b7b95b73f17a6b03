// The memory rooflines both benchmarks measure in the same run as the kernels, over
// [0, n) split into one contiguous chunk per thread:
//   inplace: read and write one array (8 B/element): what BN+ReLU in place must cost;
//   copy:    memcpy a -> b (8 B/element counted; glibc picks its own store kind);
//   ntcopy:  a -> b with non-temporal stores (8 B/element, no read-for-ownership):
//            what an out-of-place pass must cost;
//   dsum:    sum of an array widened to double (4 B/element read, nothing written):
//            what a batch-norm statistics pass costs, from DRAM or (a slice summed
//            over and over) from cache, where the float->double widening bounds it.
#pragma once

#include <cstring>
#include <new>

#include <volfuse/volfuse.hpp>

namespace roofline {

using volfuse::index_t;

/// Page-aligned storage for benchmark tensors: PyTorch and oneDNN allocate tensors
/// 64-byte aligned, so whole-vector (and non-temporal) stores are aligned, as here.
template <class T>
struct page_aligned {
    using value_type = T;
    page_aligned() = default;
    template <class U>
    page_aligned(const page_aligned<U>&) noexcept {}
    T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{4096})); }
    void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{4096}); }
    bool operator==(const page_aligned&) const noexcept = default;
};

template <class F>
void chunked(index_t n, int t, F&& f)
{
#pragma omp parallel for num_threads(t) schedule(static)
    for (int i = 0; i < t; ++i) f(n * i / t, n * (i + 1) / t);
}

inline void inplace(float* p, index_t n, int t)
{
    chunked(n, t, [&](index_t lo, index_t hi) {
        for (index_t i = lo; i < hi; ++i) p[i] = p[i] * 0.5f + 0.25f; // vectorized by the compiler
    });
}

inline void copy(const float* a, float* b, index_t n, int t)
{
    chunked(n, t, [&](index_t lo, index_t hi) {
        std::memcpy(b + lo, a + lo, static_cast<std::size_t>(hi - lo) * sizeof(float));
    });
}

inline void ntcopy(const float* a, float* b, index_t n, int t)
{
    namespace simd = volfuse::simd;
    chunked(n, t, [&](index_t lo, index_t hi) {
        index_t i = lo;
        for (; i < hi && !simd::stream_aligned(b + i); ++i) b[i] = a[i];
        for (; i + simd::width <= hi; i += simd::width) simd::store_stream(b + i, simd::load(a + i));
        for (; i < hi; ++i) b[i] = a[i];
        simd::stream_fence();
    });
}

/// Sum of a[0, n) widened to double, `repeat` times (a slice summed repeatedly stays in cache).
inline double dsum(const float* a, index_t n, int t, index_t repeat = 1)
{
    namespace simd = volfuse::simd;
    double total = 0;
#pragma omp parallel for num_threads(t) schedule(static) reduction(+ : total)
    for (int k = 0; k < t; ++k) {
        const index_t lo = n * k / t, hi = n * (k + 1) / t;
        simd::dacc s0, s1;
        for (index_t r = 0; r < repeat; ++r) {
            index_t i = lo;
            for (; i + 2 * simd::width <= hi; i += 2 * simd::width) {
                s0.add(simd::load(a + i));
                s1.add(simd::load(a + i + simd::width));
            }
            for (; i < hi; ++i) total += a[i];
        }
        total += simd::dacc::total(s0, s1);
    }
    return total;
}

} // namespace roofline
