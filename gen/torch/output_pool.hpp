// Memory for the operators' outputs, kept for reuse.  A fresh buffer costs more than the
// kernel that fills it: glibc serves blocks over 32 MiB with a new mmap each time, and the
// first touch of every 4 KiB page faults (measured on this project's Intel VM: 16 ms to fill a
// fresh 32 MiB tensor, 6 ms to copy 32 MiB into memory already touched; the forward kernel
// itself is about 8 ms).  Training allocates the same sizes every step, so an output freed by
// PyTorch goes back to this pool (reused for a request of exactly its size) instead of to the
// system, and new blocks of 2 MiB or more are 2 MiB-aligned and advised for transparent huge
// pages (512x fewer faults when they are first touched).  Bounded: at most
// VOLFUSE_TORCH_POOL_MB MiB are kept (default 1024; 0 keeps nothing).  PyTorch's CPU allocator
// keeps nothing, which is why its own batch norm pays those faults on every call.
#pragma once

#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

namespace volfuse_torch {

class output_pool final : public c10::Allocator {
public:
    /// The process's pool (never destroyed: tensors may outlive static destruction).
    static output_pool& instance()
    {
        static output_pool* const pool = new output_pool;
        return *pool;
    }

    c10::DataPtr allocate(std::size_t bytes) const override { return const_cast<output_pool*>(this)->take(bytes); }

    /// Bytes held for reuse now (tests).
    std::size_t cached() const
    {
        std::lock_guard<std::mutex> lock(mutex_);
        return cached_;
    }

private:
    static constexpr std::size_t huge_page = std::size_t{2} << 20;

    struct block {
        void* data;
        std::size_t bytes;
    };

    output_pool()
    {
        const char* mb = std::getenv("VOLFUSE_TORCH_POOL_MB");
        limit_ = (mb ? std::strtoull(mb, nullptr, 10) : 1024) << 20;
    }

    c10::DataPtr take(std::size_t bytes)
    {
        block* b = nullptr;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (auto it = free_.find(bytes); it != free_.end()) {
                b = it->second;
                free_.erase(it);
                cached_ -= bytes;
            }
        }
        if (!b) b = new block{fresh(bytes), bytes};
        return {b->data, b, &give_back, c10::Device(c10::kCPU)};
    }

    static void give_back(void* ctx) { instance().put(static_cast<block*>(ctx)); }

    void put(block* b)
    {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (cached_ + b->bytes <= limit_) {
                free_.emplace(b->bytes, b);
                cached_ += b->bytes;
                return;
            }
        }
        std::free(b->data);
        delete b;
    }

    static void* fresh(std::size_t bytes)
    {
        const std::size_t align = bytes >= huge_page ? huge_page : 64;
        const std::size_t n = std::max<std::size_t>((bytes + align - 1) / align * align, align);
        void* p = std::aligned_alloc(align, n);
        TORCH_CHECK(p != nullptr, "volfuse: out of memory allocating ", bytes, " bytes for an operator's output");
        if (align == huge_page) madvise(p, n, MADV_HUGEPAGE); // advice only: its failure changes nothing
        return p;
    }

    mutable std::mutex mutex_;
    std::multimap<std::size_t, block*> free_;
    std::size_t cached_ = 0;
    std::size_t limit_ = 0;
};

} // namespace volfuse_torch
