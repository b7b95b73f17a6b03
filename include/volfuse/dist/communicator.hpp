// What SyncBatchNorm3d needs from a transport: the group's size, this process's rank, and an
// all-gather of equal-sized byte blocks in rank order.  Any type with those three members is a
// vf::communicator (the MPI adapter, <volfuse/dist/mpi.hpp>, is one; a test's in-process fake
// is another); modules hold it as a communicator_ref, so their type names only C.
#pragma once

#include "../core/config.hpp"

#include <concepts>
#include <cstddef>
#include <cstring>

namespace volfuse::inline VOLFUSE_ISA_NS {

/// size() processes numbered 0..size()-1; all_gather(send, recv, bytes) is collective: every
/// process passes `bytes` bytes, and recv (size() * bytes) receives process r's at r * bytes,
/// on every process.  It must not throw: SyncBatchNorm3d calls it after every process has
/// agreed that the call is valid, in the same order on all of them.
template <class T>
concept communicator = requires(T& c, const void* send, void* recv, std::size_t bytes) {
    { c.size() } -> std::convertible_to<int>;
    { c.rank() } -> std::convertible_to<int>;
    c.all_gather(send, recv, bytes);
};

/// A non-owning, type-erased reference to a communicator (which must outlive it).
class communicator_ref {
public:
    template <communicator C>
        requires(!std::same_as<C, communicator_ref>)
    communicator_ref(C& c) noexcept // NOLINT: implicit on purpose (any communicator converts)
        : self_(&c), size_([](void* s) { return static_cast<int>(static_cast<C*>(s)->size()); }),
          rank_([](void* s) { return static_cast<int>(static_cast<C*>(s)->rank()); }),
          gather_([](void* s, const void* send, void* recv, std::size_t bytes) {
              static_cast<C*>(s)->all_gather(send, recv, bytes);
          })
    {
    }
    int size() const { return size_(self_); }
    int rank() const { return rank_(self_); }
    void all_gather(const void* send, void* recv, std::size_t bytes) const { gather_(self_, send, recv, bytes); }

private:
    void* self_;
    int (*size_)(void*);
    int (*rank_)(void*);
    void (*gather_)(void*, const void*, void*, std::size_t);
};

/// The group of this process alone: all_gather copies its block.  What a SyncBatchNorm3d
/// whose split phases are driven from outside holds (forward_message, ...: its transport is
/// the caller's), and a single-process run's group.
struct solo_communicator {
    int size() const noexcept { return 1; }
    int rank() const noexcept { return 0; }
    void all_gather(const void* send, void* recv, std::size_t bytes) const noexcept { std::memcpy(recv, send, bytes); }
};
static_assert(communicator<solo_communicator>);

} // namespace volfuse
