// The MPI adapter: vf::mpi_communicator over an MPI communicator (Open MPI from Debian's
// libopenmpi-dev; link with meson's dependency('mpi', language: 'cpp')).  Not in the umbrella
// header: only programs that use MPI include it (after MPI_Init).
#pragma once

#include <mpi.h>

#include <climits>
#include <cstdio>

#include "../core/error.hpp"
#include "communicator.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

/// A vf::communicator over `comm` (MPI_COMM_WORLD or any sub-communicator), which must stay
/// valid while modules use it.  all_gather is MPI_Allgather of bytes.
class mpi_communicator {
public:
    explicit mpi_communicator(MPI_Comm comm) : comm_(comm)
    {
        int initialized = 0;
        MPI_Initialized(&initialized);
        if (!initialized) throw error("mpi_communicator: MPI is not initialized (call MPI_Init first)");
        MPI_Comm_size(comm_, &size_);
        MPI_Comm_rank(comm_, &rank_);
    }
    int size() const noexcept { return size_; }
    int rank() const noexcept { return rank_; }
    MPI_Comm comm() const noexcept { return comm_; }

    /// MPI_Allgather of `bytes` bytes per process (MPI counts are int: at most INT_MAX bytes,
    /// which SyncBatchNorm3d's validation guarantees; a larger call aborts the job with a message).
    void all_gather(const void* send, void* recv, std::size_t bytes) const noexcept
    {
        if (bytes > static_cast<std::size_t>(INT_MAX)) {
            std::fputs("volfuse::mpi_communicator: an all-gather of more than INT_MAX bytes per process\n", stderr);
            MPI_Abort(comm_, 1);
        }
        MPI_Allgather(send, static_cast<int>(bytes), MPI_BYTE, recv, static_cast<int>(bytes), MPI_BYTE, comm_);
    }

private:
    MPI_Comm comm_;
    int size_ = 1, rank_ = 0;
};
static_assert(communicator<mpi_communicator>);

} // namespace volfuse
