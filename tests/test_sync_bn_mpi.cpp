// SyncBatchNorm3d over MPI: run under `mpirun -n P` (P = 1..4, shared memory); every rank runs
// Catch2 on its own part and checks it against BatchNorm3d and the float64 reference of the
// global batch; statistics must carry the same bits on every rank (gathered and compared), and
// errors must be raised on every rank with no state changed.  The same scenarios as
// tests/test_sync_bn.cpp (threads), here across processes.
#define CATCH_CONFIG_RUNNER
#include <mpi.h>

#include <volfuse/dist/mpi.hpp>

#include "sync_support.hpp"

namespace {
/// All ranks' copies of v (same size everywhere), rank order.
std::vector<std::vector<float>> gather_all(vf::mpi_communicator& comm, const std::vector<float>& v)
{
    std::vector<float> all(v.size() * static_cast<std::size_t>(comm.size()));
    comm.all_gather(v.data(), all.data(), v.size() * sizeof(float));
    std::vector<std::vector<float>> out;
    for (int r = 0; r < comm.size(); ++r)
        out.emplace_back(all.begin() + static_cast<std::ptrdiff_t>(r * v.size()),
                         all.begin() + static_cast<std::ptrdiff_t>((r + 1) * v.size()));
    return out;
}
} // namespace

TEST_CASE("SyncBatchNorm3d over MPI equals BatchNorm3d on the global batch", "[sync][mpi]")
{
    vf::mpi_communicator comm(MPI_COMM_WORLD);
    const int P = comm.size();
    for (const auto& sc : sync_scenarios(P)) {
        const auto o = run_sync_scenario(sc, comm);
        std::vector<std::vector<float>> gw, gb;
        for (const auto& s : o.steps) {
            // DDP's all-reduce of the local grads, done here by gathering and summing in rank order.
            std::vector<float> w(static_cast<std::size_t>(sc.C), 0.f), b(static_cast<std::size_t>(sc.C), 0.f);
            if (sc.affine) {
                for (const auto& v : gather_all(comm, s.weight_grad))
                    for (std::size_t c = 0; c < v.size(); ++c) w[c] += v[c];
                for (const auto& v : gather_all(comm, s.bias_grad))
                    for (std::size_t c = 0; c < v.size(); ++c) b[c] += v[c];
            }
            gw.push_back(w);
            gb.push_back(b);
            // The same running statistics, bit for bit, on every rank.
            if (sc.track)
                for (const auto* stat : {&s.running_mean, &s.running_var})
                    for (const auto& v : gather_all(comm, *stat)) CHECK(same_bits(v, *stat));
        }
        check_sync_observed(sc, o, sc.affine ? &gw : nullptr, &gb);
        check_sync_against_float64(sc, o);
    }
}

TEST_CASE("SyncBatchNorm3d over MPI: errors are agreed by all ranks", "[sync][mpi][errors]")
{
    vf::mpi_communicator comm(MPI_COMM_WORLD);
    const int P = comm.size(), r = comm.rank();
    const index_t C = 4;
    // The last rank passes a wrong channel count: every rank throws, nothing changes.
    {
        vf::SyncBatchNorm3d<> bn(C, comm);
        const index_t c = r == P - 1 ? C + 1 : C;
        std::vector<float> x(static_cast<std::size_t>(2 * c * 8), 1.f), y(x.size(), -7.f);
        for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 5);
        bool threw = false;
        try {
            bn.forward(vf::ndhwc_view(x.data(), 2, c, 2, 2, 2), vf::ndhwc_view(y.data(), 2, c, 2, 2, 2));
        } catch (const vf::error& e) {
            threw = true;
            if (r != P - 1) CHECK_THAT(e.what(), Catch::Contains("failed"));
        }
        CHECK(threw);
        CHECK(bn.num_batches_tracked() == 0);
        CHECK(std::all_of(y.begin(), y.end(), [](float v) { return v == -7.f; }));
        CHECK(std::all_of(bn.running_var().begin(), bn.running_var().end(), [](float v) { return v == 1.f; }));
    }
    // One value per channel over the whole group (rank 0 has one, the others none).
    {
        vf::SyncBatchNorm3d<64> bn(64, comm);
        std::vector<float> x(64, 2.f), y(64, -7.f);
        const index_t n = r == 0 ? 1 : 0;
        bool threw = false;
        try {
            bn.forward(vf::ncdhw_view(x.data(), n, 64, 1, 1, 1), vf::ncdhw_view(y.data(), n, 64, 1, 1, 1), vf::relu);
        } catch (const vf::error& e) {
            threw = true;
            CHECK_THAT(e.what(), Catch::Contains("Expected more than 1 value per channel when training"));
        }
        CHECK(threw);
        CHECK(bn.num_batches_tracked() == 0);
    }
}

int main(int argc, char** argv)
{
    MPI_Init(&argc, &argv);
    vf::set_num_threads(1); // ranks share this machine's cores
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    Catch::Session session;
    int failed = session.applyCommandLine(argc, argv);
    // One report per job: rank 0's (the others write theirs next to it).
    if (rank != 0 && !session.configData().outputFilename.empty())
        session.configData().outputFilename += ".rank" + std::to_string(rank);
    if (failed == 0) failed = session.run();
    // A rank that failed makes the job fail (mpirun returns non-zero).
    int any = failed != 0, all = 0;
    MPI_Allreduce(&any, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return all ? 1 : 0;
}
