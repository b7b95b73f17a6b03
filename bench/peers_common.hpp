// What both peer benchmarks (bench_peers: BatchNorm3d, bench_conv: Conv3d and the fused
// block) need to run oneDNN and libtorch fairly in one process: one thread count for all
// three libraries, and a caching CPU allocator so libtorch's per-call outputs are recycled
// instead of page-faulted in on every call (what is timed is its kernels).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <volfuse/volfuse.hpp>

namespace peers {

namespace vf = volfuse;

/// Caching CPU allocator for libtorch: freed blocks are kept per size and handed out again.
class caching_allocator final : public c10::Allocator {
public:
    c10::DataPtr allocate(std::size_t n) const override
    {
        std::lock_guard<std::mutex> lock(m());
        void* p = nullptr;
        auto& free_list = cache()[n];
        if (!free_list.empty()) {
            p = free_list.back();
            free_list.pop_back();
        } else {
            p = std::aligned_alloc(64, (std::max<std::size_t>(n, 1) + 63) / 64 * 64);
        }
        sizes()[p] = n;
        return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
    }
    c10::DeleterFnPtr raw_deleter() const override { return &release; }
    /// Frees every cached block (between benchmarks: the cache must not pile up gigabytes).
    static void trim()
    {
        std::lock_guard<std::mutex> lock(m());
        for (auto& [size, blocks] : cache())
            for (void* p : blocks) std::free(p);
        cache().clear();
    }

private:
    static void release(void* p)
    {
        std::lock_guard<std::mutex> lock(m());
        auto it = sizes().find(p);
        cache()[it->second].push_back(p);
        sizes().erase(it);
    }
    static std::mutex& m()
    {
        static std::mutex mu;
        return mu;
    }
    static std::unordered_map<std::size_t, std::vector<void*>>& cache()
    {
        static std::unordered_map<std::size_t, std::vector<void*>> c;
        return c;
    }
    static std::unordered_map<void*, std::size_t>& sizes()
    {
        static std::unordered_map<void*, std::size_t> z;
        return z;
    }
};

/// The same number of threads for volfuse, oneDNN (OpenMP) and libtorch.
inline void set_threads(int t)
{
    vf::set_num_threads(t);
    omp_set_num_threads(t); // oneDNN (Debian: OpenMP runtime)
    at::set_num_threads(t);
}

/// Installs the caching allocator as libtorch's CPU allocator (once, before any tensor).
inline void install_torch_cache()
{
    static caching_allocator cache;
    c10::SetCPUAllocator(&cache, /*priority*/ 100);
    c10::SetAllocator(c10::DeviceType::CPU, &cache, /*priority*/ 100); // what at::empty uses
}

} // namespace peers
