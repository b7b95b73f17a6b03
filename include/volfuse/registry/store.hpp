// The one table of generated kernels in a process, shared by code compiled for every ISA.
// Everything else of volfuse lives in an inline namespace named after the instruction set its
// TU was compiled for (core/config.hpp), so TUs built with different -march never share a
// symbol; this store is the exception that lets them meet: it keeps each registration's kernels
// type-erased with the ISA they were compiled for, and registry::table (registry.hpp) hands
// code only the entries of its own ISA, saying why when it refuses one.
// Thread safety: added under an exclusive lock, found under a shared one; never removed.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <list>
#include <vector>

namespace volfuse::registry_store {

/// One registration: a layer's kernels as the generated TU built them.
struct record {
    std::string isa;                  // the instruction set they were compiled for
    std::string origin;               // "video.arch:3 (conv1)"
    std::shared_ptr<const void> entry; // that ISA's registry::entry
};

class store {
public:
    /// Adds r under key; the first registration of a key for an ISA wins.
    bool add(const std::string& key, record r)
    {
        std::unique_lock lock(mutex_);
        auto& list = records_[key];
        for (const record& o : list)
            if (o.isa == r.isa) return false;
        list.push_back(std::move(r));
        generation_.fetch_add(1, std::memory_order_release);
        return true;
    }
    /// The records of key (any ISA), in registration order.
    std::vector<const record*> find(const std::string& key) const
    {
        std::shared_lock lock(mutex_);
        std::vector<const record*> out;
        if (const auto it = records_.find(key); it != records_.end())
            for (const record& r : it->second) out.push_back(&r);
        return out;
    }
    /// Registrations compiled for `isa`.
    std::size_t count(const std::string& isa) const
    {
        std::shared_lock lock(mutex_);
        std::size_t n = 0;
        for (const auto& [k, list] : records_)
            for (const record& r : list) n += r.isa == isa;
        return n;
    }
    /// Changes whenever what a lookup could answer changes: modules cache their resolution
    /// and resolve again only when it moved (one atomic load per call).
    std::uint64_t generation() const noexcept { return generation_.load(std::memory_order_acquire); }
    void touch() noexcept { generation_.fetch_add(1, std::memory_order_release); }

private:
    mutable std::shared_mutex mutex_;
    std::atomic<std::uint64_t> generation_{1};
    std::map<std::string, std::list<record>> records_; // node-based: records stay where they are
};

/// The process-wide store.
inline store& global()
{
    static store s;
    return s;
}

} // namespace volfuse::registry_store
