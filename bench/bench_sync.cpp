// SyncBatchNorm3d against BatchNorm3d per rank: run under `mpirun -n P` (bench/run sync runs
// P = 1, 2, 4).  Each rank holds its own part of the batch (the same per-rank shape for every
// P: weak scaling, as data-parallel training grows) and runs forward (train, + ReLU) and
// backward, one thread per rank.  Printed by rank 0: the per-rank time of BatchNorm3d on the
// local part, of SyncBatchNorm3d, and of SyncBatchNorm3d's all-gathers (time inside the
// communicator, waiting for the slowest rank included), medians over iterations, maxima over
// ranks.  With more ranks than cores, ranks share cores: those rows are marked.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <volfuse/dist/mpi.hpp>
#include <volfuse/volfuse.hpp>

namespace vf = volfuse;
using vf::index_t;
using clk = std::chrono::steady_clock;

namespace {

/// The MPI communicator, timing its all-gathers.
struct timed_communicator {
    vf::mpi_communicator& inner;
    double seconds = 0;
    int size() const { return inner.size(); }
    int rank() const { return inner.rank(); }
    void all_gather(const void* send, void* recv, std::size_t bytes)
    {
        const auto t0 = clk::now();
        inner.all_gather(send, recv, bytes);
        seconds += std::chrono::duration<double>(clk::now() - t0).count();
    }
};

double median(std::vector<double> v)
{
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

double max_over_ranks(double v)
{
    double m = 0;
    MPI_Allreduce(&v, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return m;
}

} // namespace

int main(int argc, char** argv)
{
    MPI_Init(&argc, &argv);
    vf::set_num_threads(1);
    int iters = 20;
    for (int i = 1; i < argc; ++i)
        if (std::strcmp(argv[i], "--smoke") == 0) iters = 1;
    vf::mpi_communicator world(MPI_COMM_WORLD);
    timed_communicator comm{world};
    const int P = world.size(), rank = world.rank();
    const unsigned cores = std::thread::hardware_concurrency();
    const std::vector<std::array<index_t, 5>> shapes = {{2, 64, 16, 56, 56}, {1, 64, 32, 32, 32}};
    if (rank == 0 && P == 1)
        std::printf("%-5s %-20s %14s %16s %16s %10s\n", "ranks", "shape per rank", "BN3d ms", "SyncBN ms",
                    "all-gather ms", "overhead");
    for (const auto& s : shapes) {
        const index_t n = s[0] * s[1] * s[2] * s[3] * s[4];
        std::vector<float> x(static_cast<std::size_t>(n)), y(x.size()), dy(x.size()), dx(x.size());
        std::mt19937 g(static_cast<unsigned>(rank) + 1);
        std::normal_distribution<float> d(1.f, 2.f);
        for (auto& v : x) v = d(g);
        for (auto& v : dy) v = d(g);
        auto X = vf::ncdhw_view(static_cast<const float*>(x.data()), s[0], vf::fix<64>, s[2], s[3], s[4]);
        auto Y = vf::ncdhw_view(y.data(), s[0], vf::fix<64>, s[2], s[3], s[4]);
        auto DY = vf::ncdhw_view(static_cast<const float*>(dy.data()), s[0], vf::fix<64>, s[2], s[3], s[4]);
        auto DX = vf::ncdhw_view(dx.data(), s[0], vf::fix<64>, s[2], s[3], s[4]);
        vf::BatchNorm3d<64> bn;
        vf::SyncBatchNorm3d<64> sbn(64, comm);
        std::vector<double> t_bn, t_sync, t_comm;
        for (int it = 0; it < iters + 2; ++it) { // two warm-up iterations
            MPI_Barrier(MPI_COMM_WORLD);
            auto t0 = clk::now();
            bn.forward(X, Y, vf::relu);
            bn.backward(X, DY, DX, vf::relu);
            const double a = std::chrono::duration<double>(clk::now() - t0).count();
            MPI_Barrier(MPI_COMM_WORLD);
            comm.seconds = 0;
            t0 = clk::now();
            sbn.forward(X, Y, vf::relu);
            sbn.backward(X, DY, DX, vf::relu);
            const double b = std::chrono::duration<double>(clk::now() - t0).count();
            if (it >= 2 || iters == 1) {
                t_bn.push_back(a);
                t_sync.push_back(b);
                t_comm.push_back(comm.seconds);
            }
        }
        const double mb = max_over_ranks(median(t_bn)) * 1e3, ms = max_over_ranks(median(t_sync)) * 1e3,
                     mc = max_over_ranks(median(t_comm)) * 1e3;
        if (rank == 0) {
            const std::string shape = std::to_string(s[0]) + "x" + std::to_string(s[1]) + "x" + std::to_string(s[2]) +
                                      "x" + std::to_string(s[3]) + "x" + std::to_string(s[4]);
            std::printf("%-5d %-20s %14.3f %16.3f %16.3f %9.1f%%%s\n", P, shape.c_str(), mb, ms, mc,
                        100.0 * (ms - mb) / mb, static_cast<unsigned>(P) > cores ? "   (ranks share cores)" : "");
        }
    }
    MPI_Finalize();
    return 0;
}
