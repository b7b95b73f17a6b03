// SyncBatchNorm3d over an in-process communicator (ranks as threads): equal to BatchNorm3d on
// the global batch for 1-4 ranks, uneven splits and a rank with no samples; statistics identical
// on every rank; errors agreed by all ranks with no state changed anywhere; eval mode silent.
// tests/test_sync_bn_mpi.cpp runs the same scenarios as processes under mpirun.
#include <algorithm>
#include <exception>
#include <tuple>
#include <mutex>

#include "sync_support.hpp"

namespace {

/// The ranks' shared mailbox: all_gather copies each rank's bytes in, waits for all, copies
/// every rank's out, waits again (so a slot is not overwritten while another rank reads it).
struct fake_world {
    explicit fake_world(int p) : size(p), sync(p), slots(static_cast<std::size_t>(p)) {}
    int size;
    std::barrier<> sync;
    std::vector<std::vector<char>> slots;
    std::atomic<bool> mismatch{false}; // ranks passed different byte counts: a protocol bug
};

struct fake_communicator {
    fake_world* w;
    int r;
    int calls = 0;
    int size() const { return w->size; }
    int rank() const { return r; }
    void all_gather(const void* send, void* recv, std::size_t bytes)
    {
        ++calls;
        auto* s = static_cast<const char*>(send);
        w->slots[static_cast<std::size_t>(r)].assign(s, s + bytes);
        w->sync.arrive_and_wait();
        for (int q = 0; q < w->size; ++q) {
            const auto& slot = w->slots[static_cast<std::size_t>(q)];
            if (slot.size() != bytes) w->mismatch = true;
            else std::memcpy(static_cast<char*>(recv) + static_cast<std::size_t>(q) * bytes, slot.data(), bytes);
        }
        w->sync.arrive_and_wait();
    }
};
static_assert(vf::communicator<fake_communicator>);

/// Runs body(comm) on P threads, one rank each; returns each rank's result.
template <class R, class F>
std::vector<R> on_ranks(int P, F body)
{
    fake_world w(P);
    std::vector<R> out(static_cast<std::size_t>(P));
    std::vector<std::thread> ts;
    for (int r = 0; r < P; ++r)
        ts.emplace_back([&, r] {
            fake_communicator c{&w, r};
            out[static_cast<std::size_t>(r)] = body(c);
        });
    for (auto& t : ts) t.join();
    REQUIRE(!w.mismatch);
    return out;
}

} // namespace

TEST_CASE("SyncBatchNorm3d equals BatchNorm3d on the global batch (1-4 ranks in one process)", "[sync]")
{
    const int threads = vf::get_num_threads();
    vf::set_num_threads(1); // ranks are the threads here
    for (int P = 1; P <= 4; ++P)
        for (const auto& sc : sync_scenarios(P)) {
            const auto obs = on_ranks<sync_observed>(P, [&](fake_communicator& c) { return run_sync_scenario(sc, c); });
            std::vector<std::vector<float>> gw(obs[0].steps.size()), gb(obs[0].steps.size());
            for (std::size_t k = 0; k < gw.size(); ++k) {
                gw[k].assign(static_cast<std::size_t>(sc.C), 0.f);
                gb[k].assign(static_cast<std::size_t>(sc.C), 0.f);
                for (const auto& o : obs)
                    for (std::size_t c = 0; c < o.steps[k].weight_grad.size(); ++c) {
                        gw[k][c] += o.steps[k].weight_grad[c];
                        gb[k][c] += o.steps[k].bias_grad[c];
                    }
            }
            for (int r = 0; r < P; ++r) {
                INFO("rank " << r << " of " << P);
                check_sync_observed(sc, obs[static_cast<std::size_t>(r)], sc.affine ? &gw : nullptr, &gb);
                // Every rank's running statistics carry the same bits.
                for (std::size_t k = 0; k < obs[0].steps.size(); ++k) {
                    CHECK(same_bits(obs[static_cast<std::size_t>(r)].steps[k].running_mean, obs[0].steps[k].running_mean));
                    CHECK(same_bits(obs[static_cast<std::size_t>(r)].steps[k].running_var, obs[0].steps[k].running_var));
                }
            }
            for (const auto& o : obs) check_sync_against_float64(sc, o);
        }
    vf::set_num_threads(threads);
}

namespace {
struct error_outcome {
    std::string what;
    bool state_unchanged = false;
};

/// Runs a training forward where `bad_rank` passes something wrong (`how`), on P ranks, after
/// one good step; every rank must throw, and none may have changed its module.
std::vector<error_outcome> forward_with_error(int P, int bad_rank, const std::string& how)
{
    return on_ranks<error_outcome>(P, [&](fake_communicator& comm) {
        const int r = comm.rank();
        const index_t C = 3;
        sizes5 s{2, C, 2, 3, 4};
        std::mt19937 g(7 + static_cast<unsigned>(r));
        auto x = randn(numel(s), g);
        std::vector<float> y(x.size());
        vf::SyncBatchNorm3d<> bn(C, comm);
        bn.forward(vf::ncdhw_view(x.data(), s[0], s[1], s[2], s[3], s[4]),
                   vf::ncdhw_view(y.data(), s[0], s[1], s[2], s[3], s[4]));
        const auto rm = vec(bn.running_mean()), rv = vec(bn.running_var());
        const auto nbt = bn.num_batches_tracked();
        const auto y_before = y;
        error_outcome o;
        sizes5 t = s;
        float* xp = x.data();
        if (how == "count1") t = {r == 0 ? 1 : 0, C, 1, 1, 1};
        if (r == bad_rank) {
            if (how == "channels") t[1] = C + 1;
            if (how == "null") xp = nullptr;
        }
        std::vector<float> xt(static_cast<std::size_t>(std::max<index_t>(numel(t), 1)), 1.f),
            yt(static_cast<std::size_t>(std::max<index_t>(numel(t), 1)), -7.f);
        if (how == "null" || how == "overlap") xt = x;
        try {
            if (how == "overlap" && r == bad_rank)
                bn.forward(vf::ncdhw_view(x.data(), s[0], s[1], s[2], s[3], s[4]),
                           vf::ncdhw_view(x.data() + 1, s[0], s[1], s[2], s[3], s[4]));
            else
                bn.forward(vf::ncdhw_view(how == "null" ? xp : xt.data(), t[0], t[1], t[2], t[3], t[4]),
                           vf::ncdhw_view(yt.data(), t[0], t[1], t[2], t[3], t[4]));
            o.what = "no error";
        } catch (const vf::error& e) {
            o.what = e.what();
        }
        o.state_unchanged = same_bits(vec(bn.running_mean()), rm) && same_bits(vec(bn.running_var()), rv) &&
                            bn.num_batches_tracked() == nbt && same_bits(y, y_before) &&
                            std::all_of(yt.begin(), yt.end(), [](float v) { return v == -7.f; });
        return o;
    });
}
} // namespace

TEST_CASE("SyncBatchNorm3d: an error on one rank is an error on all, and nothing changes anywhere", "[sync][errors]")
{
    for (const std::string how : {"channels", "null", "overlap"}) {
        const auto out = forward_with_error(3, 1, how);
        for (int r = 0; r < 3; ++r) {
            INFO(how << " rank " << r << ": " << out[static_cast<std::size_t>(r)].what);
            CHECK(out[static_cast<std::size_t>(r)].what != "no error");
            CHECK(out[static_cast<std::size_t>(r)].state_unchanged);
            if (r != 1 && how != "channels")
                CHECK_THAT(out[static_cast<std::size_t>(r)].what, Catch::Contains("process 1 of 3 failed"));
        }
        if (how == "channels") {
            // Rank 1's own module rejects C = 4 (ATen's message); the others learn it from rank 1.
            CHECK_THAT(out[1].what, Catch::Contains("running_mean should contain 4 elements not 3"));
        }
    }
    // One value per channel over the whole group: PyTorch's training error, on every rank.
    const auto out = forward_with_error(2, -1, "count1");
    for (const auto& o : out) {
        CHECK_THAT(o.what, Catch::Contains("Expected more than 1 value per channel when training"));
        CHECK(o.state_unchanged);
    }
}

TEST_CASE("SyncBatchNorm3d: backward errors are agreed too and leave the grads alone", "[sync][errors]")
{
    const auto out = on_ranks<error_outcome>(2, [&](fake_communicator& comm) {
        const sizes5 s{2, 4, 2, 2, 3};
        std::mt19937 g(3);
        auto x = randn(numel(s), g), dy = randn(numel(s), g);
        std::vector<float> y(x.size()), dx(x.size(), -7.f);
        vf::SyncBatchNorm3d<> bn(4, comm);
        auto X = vf::ncdhw_view(x.data(), s[0], s[1], s[2], s[3], s[4]);
        bn.forward(X, vf::ncdhw_view(y.data(), s[0], s[1], s[2], s[3], s[4]), vf::relu);
        bn.backward(X, vf::ncdhw_view(dy.data(), s[0], s[1], s[2], s[3], s[4]),
                    vf::ncdhw_view(dx.data(), s[0], s[1], s[2], s[3], s[4]), vf::relu);
        const auto gw = vec(bn.weight_grad()), gb = vec(bn.bias_grad());
        std::fill(dx.begin(), dx.end(), -7.f);
        error_outcome o;
        try {
            if (comm.rank() == 0) // the forward applied relu: backward without it is an error
                bn.backward(X, vf::ncdhw_view(dy.data(), s[0], s[1], s[2], s[3], s[4]),
                            vf::ncdhw_view(dx.data(), s[0], s[1], s[2], s[3], s[4]));
            else
                bn.backward(X, vf::ncdhw_view(dy.data(), s[0], s[1], s[2], s[3], s[4]),
                            vf::ncdhw_view(dx.data(), s[0], s[1], s[2], s[3], s[4]), vf::relu);
            o.what = "no error";
        } catch (const vf::error& e) {
            o.what = e.what();
        }
        o.state_unchanged = same_bits(vec(bn.weight_grad()), gw) && same_bits(vec(bn.bias_grad()), gb) &&
                            std::all_of(dx.begin(), dx.end(), [](float v) { return v == -7.f; });
        return o;
    });
    CHECK_THAT(out[0].what, Catch::Contains("backward was given identity"));
    CHECK_THAT(out[1].what, Catch::Contains("process 0 of 2 failed"));
    CHECK(out[0].state_unchanged);
    CHECK(out[1].state_unchanged);
}

TEST_CASE("SyncBatchNorm3d: eval mode communicates nothing; from() converts a BatchNorm3d", "[sync]")
{
    const auto calls = on_ranks<int>(2, [&](fake_communicator& comm) {
        const sizes5 s{1, 3, 2, 2, 2};
        std::mt19937 g(5);
        auto x = randn(numel(s), g), dy = randn(numel(s), g);
        std::vector<float> y(x.size()), dx(x.size());
        vf::BatchNorm3d<> plain(3, 1e-3, std::nullopt);
        plain.running_mean()[1] = 0.5f;
        plain.set_num_batches_tracked(4);
        auto bn = vf::SyncBatchNorm3d<>::from(plain, comm);
        bn.eval();
        auto X = vf::ncdhw_view(x.data(), s[0], s[1], s[2], s[3], s[4]);
        bn.forward(X, vf::ncdhw_view(y.data(), s[0], s[1], s[2], s[3], s[4]));
        bn.backward(X, vf::ncdhw_view(dy.data(), s[0], s[1], s[2], s[3], s[4]),
                    vf::ncdhw_view(dx.data(), s[0], s[1], s[2], s[3], s[4]));
        const bool copied = bn.running_mean()[1] == 0.5f && bn.num_batches_tracked() == 4 && bn.eps() == 1e-3 &&
                            !bn.momentum() && bn.repr() == "SyncBatchNorm(3, eps=0.001, momentum=None, affine=True, "
                                                           "track_running_stats=True)";
        return copied ? comm.calls : -1;
    });
    CHECK(calls[0] == 0);
    CHECK(calls[1] == 0);
}

namespace {
/// One rank's fused block (conv -> SyncBatchNorm3d -> ReLU) against the plain block on the
/// global batch, both from the same weights: this rank's part of Y and dX, and its grads.
struct block_outcome {
    std::vector<float> y, dx, ref_y, ref_dx;
    std::vector<float> conv_wgrad, bn_wgrad, ref_conv_wgrad, ref_bn_wgrad;
    std::vector<float> running_var, ref_running_var;
    std::string error;
};

template <class L>
block_outcome sync_block_rank(fake_communicator& comm, const std::vector<index_t>& split, bool train)
{
    const int r = comm.rank();
    const index_t IC = 3, OC = 5, D = 4, H = 5, W = 6;
    index_t NG = 0, first = 0;
    for (int q = 0; q < static_cast<int>(split.size()); ++q) {
        if (q < r) first += split[static_cast<std::size_t>(q)];
        NG += split[static_cast<std::size_t>(q)];
    }
    const index_t NL = split[static_cast<std::size_t>(r)];
    std::mt19937 g(11);
    const sizes5 xg{NG, IC, D, H, W}, xl{NL, IC, D, H, W};
    const auto x = randn(numel(xg), g), w = randn(OC * IC * 27, g, 0.0, 0.3), b = randn(OC, g);
    vf::Conv3d<> c1(IC, OC, 3, 1, 1), c2(IC, OC, 3, 1, 1);
    std::copy(w.begin(), w.end(), c1.weight().begin());
    std::copy(w.begin(), w.end(), c2.weight().begin());
    std::copy(b.begin(), b.end(), c1.bias().begin());
    std::copy(b.begin(), b.end(), c2.bias().begin());
    vf::ConvBnReLU3d block(std::move(c1), vf::SyncBatchNorm3d<>(OC, comm));
    vf::ConvBnReLU3d ref(std::move(c2), vf::BatchNorm3d<>(OC));
    static_assert(std::is_same_v<typename decltype(block)::bn_type, vf::SyncBatchNorm3d<>>);
    block.train(train);
    ref.train(train);
    const sizes5 yg = ref.output_sizes(xg), yl = block.output_sizes(xl);
    const auto dy = randn(numel(yg), g);
    const index_t xper = IC * D * H * W, yper = numel(yg) / std::max<index_t>(NG, 1);
    const std::vector<float> xloc(x.begin() + first * xper, x.begin() + (first + NL) * xper),
        dyloc(dy.begin() + first * yper, dy.begin() + (first + NL) * yper);
    block_outcome o;
    auto run = [&](auto& blk, const std::vector<float>& xs, const std::vector<float>& dys, const sizes5& xsz,
                   const sizes5& ysz, std::vector<float>& yout, std::vector<float>& dxout) {
        auto xm = to_layout<L>(xs, xsz), dym = to_layout<L>(dys, ysz);
        auto ym = to_layout<L>(std::vector<float>(static_cast<std::size_t>(numel(ysz))), ysz);
        auto dxm = to_layout<L>(std::vector<float>(static_cast<std::size_t>(numel(xsz))), xsz);
        blk.forward(view_of<L>(xm.data(), xsz), view_of<L>(ym.data(), ysz));
        blk.backward(view_of<L>(xm.data(), xsz), view_of<L>(dym.data(), ysz), view_of<L>(dxm.data(), xsz));
        yout = from_layout<L>(ym, ysz);
        dxout = from_layout<L>(dxm, xsz);
    };
    try {
        run(block, xloc, dyloc, xl, yl, o.y, o.dx);
    } catch (const vf::error& e) {
        o.error = e.what();
        return o;
    }
    std::vector<float> gy, gdx;
    run(ref, x, dy, xg, yg, gy, gdx);
    o.ref_y.assign(gy.begin() + first * yper, gy.begin() + (first + NL) * yper);
    o.ref_dx.assign(gdx.begin() + first * xper, gdx.begin() + (first + NL) * xper);
    o.conv_wgrad = vec(block.conv().weight_grad());
    o.ref_conv_wgrad = vec(ref.conv().weight_grad());
    o.bn_wgrad = vec(block.bn().weight_grad());
    o.ref_bn_wgrad = vec(ref.bn().weight_grad());
    o.running_var = vec(block.bn().running_var());
    o.ref_running_var = vec(ref.bn().running_var());
    return o;
}
} // namespace

TEST_CASE("ConvBnReLU3d with a SyncBatchNorm3d part equals the block on the global batch", "[sync][block]")
{
    for (const auto& split : std::vector<std::vector<index_t>>{{2, 1}, {1, 0, 2}, {3}})
        for (const bool ndhwc : {false, true})
            for (const bool train : {true, false}) {
                const int P = static_cast<int>(split.size());
                const auto out = on_ranks<block_outcome>(P, [&](fake_communicator& c) {
                    return ndhwc ? sync_block_rank<vf::ndhwc_t>(c, split, train)
                                 : sync_block_rank<vf::ncdhw_t>(c, split, train);
                });
                std::vector<double> conv_sum(out[0].ref_conv_wgrad.size()), bn_sum(out[0].ref_bn_wgrad.size());
                for (int r = 0; r < P; ++r) {
                    const auto& o = out[static_cast<std::size_t>(r)];
                    INFO("ranks " << P << " rank " << r << (ndhwc ? " ndhwc" : " ncdhw") << (train ? " train" : " eval"));
                    REQUIRE(o.error.empty());
                    REQUIRE(o.y.size() == o.ref_y.size());
                    for (std::size_t i = 0; i < o.y.size(); ++i) CHECK_NEAR(o.y[i], o.ref_y[i], 1e-5 * (std::abs(o.ref_y[i]) + 1));
                    double dmax = 1e-30;
                    for (float v : o.ref_dx) dmax = std::max(dmax, static_cast<double>(std::abs(v)));
                    for (std::size_t i = 0; i < o.dx.size(); ++i) CHECK_NEAR(o.dx[i], o.ref_dx[i], 1e-5 * dmax);
                    for (std::size_t c = 0; c < o.running_var.size(); ++c)
                        CHECK_NEAR(o.running_var[c], o.ref_running_var[c], 1e-5 * o.ref_running_var[c]);
                    for (std::size_t i = 0; i < conv_sum.size(); ++i) conv_sum[i] += o.conv_wgrad[i];
                    for (std::size_t i = 0; i < bn_sum.size(); ++i) bn_sum[i] += o.bn_wgrad[i];
                }
                // The local grads summed over ranks (DDP's all-reduce) are the global batch's.
                double cmax = 1e-30;
                for (float v : out[0].ref_conv_wgrad) cmax = std::max(cmax, static_cast<double>(std::abs(v)));
                for (std::size_t i = 0; i < conv_sum.size(); ++i) CHECK_NEAR(conv_sum[i], out[0].ref_conv_wgrad[i], 1e-4 * cmax);
                for (std::size_t i = 0; i < bn_sum.size(); ++i)
                    CHECK_NEAR(bn_sum[i], out[0].ref_bn_wgrad[i], 1e-4 * (std::abs(out[0].ref_bn_wgrad[i]) + 1));
            }
}

TEST_CASE("ConvBnReLU3d with a SyncBatchNorm3d part: a bad input on one rank fails on all", "[sync][block][errors]")
{
    const auto out = on_ranks<std::string>(2, [&](fake_communicator& comm) -> std::string {
        vf::ConvBnReLU3d block(vf::Conv3d<>(2, 4, 3, 1, 1), vf::SyncBatchNorm3d<>(4, comm));
        const index_t ic = comm.rank() == 1 ? 3 : 2; // rank 1 passes 3 input channels
        std::vector<float> x(static_cast<std::size_t>(2 * ic * 27), 1.f), y(2 * 4 * 27, -7.f);
        try {
            block.forward(vf::ndhwc_view(x.data(), 2, ic, 3, 3, 3), vf::ndhwc_view(y.data(), 2, 4, 3, 3, 3));
        } catch (const vf::error& e) {
            const bool untouched = std::all_of(y.begin(), y.end(), [](float v) { return v == -7.f; }) &&
                                   block.bn().num_batches_tracked() == 0;
            return untouched ? e.what() : "state changed";
        }
        return "no error";
    });
    CHECK_THAT(out[0], Catch::Contains("process 1 of 2 failed"));
    CHECK(out[1] != "no error");
    CHECK(out[1] != "state changed");
}

TEST_CASE("SyncBatchNorm3d on one rank gives BatchNorm3d's bits (the phases compose to the same result)", "[sync]")
{
    // BatchNorm3d pipelines the phases across channels (NCDHW) or fuses them per group;
    // SyncBatchNorm3d runs them one after another around its all-gather: the same bits.
    for (const bool relu : {false, true}) {
        const sizes5 s{3, 6, 5, 7, 9};
        std::mt19937 g(21);
        const auto x = randn(numel(s), g, 50.0, 3.0), dy = randn(numel(s), g);
        using traces = std::array<std::vector<std::vector<float>>, 2>;
        const auto got = on_ranks<traces>(1, [&](fake_communicator& comm) {
            vf::SyncBatchNorm3d<> a(6, comm), b(6, comm);
            return traces{trace<vf::ncdhw_t>(a, x, dy, s, relu), trace<vf::ndhwc_t>(b, x, dy, s, relu)};
        });
        vf::BatchNorm3d<> a(6), b(6);
        const traces want{trace<vf::ncdhw_t>(a, x, dy, s, relu), trace<vf::ndhwc_t>(b, x, dy, s, relu)};
        for (std::size_t l = 0; l < 2; ++l)
            for (std::size_t i = 0; i < want[l].size(); ++i) {
                INFO("relu " << relu << (l ? " ndhwc" : " ncdhw") << " output " << i);
                CHECK(same_bits(got[0][l][i], want[l][i]));
            }
    }
}

TEST_CASE("SyncBatchNorm3d's split phases give forward()/backward()'s bits; their checks change nothing",
          "[sync][split]")
{
    // The PyTorch package drives the all-gathers from Python: forward_message -> gather ->
    // forward_merged, backward_message -> gather -> backward_merged.  Same phases as the
    // communicator path, so the same bits (3 ranks, one with no samples).
    const std::vector<index_t> split{2, 0, 3};
    const index_t C = 5, D = 3, H = 4, W = 5;
    for (const bool relu : {false, true}) {
        std::mt19937 g(33);
        std::vector<std::vector<float>> xs, dys;
        for (index_t n : split) {
            xs.push_back(randn(n * C * D * H * W, g, 2.0, 3.0));
            dys.push_back(randn(n * C * D * H * W, g));
        }
        struct result {
            std::vector<float> y, dx, rm, rv, wg, bg;
        };
        auto sizes = [&](int r) { return sizes5{split[static_cast<std::size_t>(r)], C, D, H, W}; };
        auto run_steps = [&](auto& m, int r, auto&& fwd, auto&& bwd) {
            result o;
            auto x = xs[static_cast<std::size_t>(r)];
            o.y.assign(x.size(), 0.f);
            o.dx.assign(x.size(), 0.f);
            const auto s = sizes(r);
            fwd(m, view_of<vf::ndhwc_t>(x.data(), s).as_const(), view_of<vf::ndhwc_t>(o.y.data(), s));
            bwd(m, view_of<vf::ndhwc_t>(x.data(), s).as_const(),
                view_of<vf::ndhwc_t>(dys[static_cast<std::size_t>(r)].data(), s).as_const(),
                view_of<vf::ndhwc_t>(o.dx.data(), s));
            o.rm = vec(m.running_mean()), o.rv = vec(m.running_var());
            o.wg = vec(m.weight_grad()), o.bg = vec(m.bias_grad());
            return o;
        };
        const auto want = on_ranks<result>(3, [&](fake_communicator& comm) {
            vf::SyncBatchNorm3d<> m(C, comm);
            return run_steps(
                m, comm.rank(),
                [&](auto& mod, auto X, auto Y) { relu ? mod.forward(X, Y, vf::relu) : mod.forward(X, Y); },
                [&](auto& mod, auto X, auto DY, auto DX) {
                    relu ? mod.backward(X, DY, DX, vf::relu) : mod.backward(X, DY, DX);
                });
        });
        // Split: every rank's halves in turn, the "gathers" done here by concatenation.
        struct nobody {
            int size() const { return 1; }
            int rank() const { return 0; }
            void all_gather(const void*, void*, std::size_t) { std::abort(); } // the split API never calls it
        } none;
        std::vector<vf::SyncBatchNorm3d<>> mods;
        for (int r = 0; r < 3; ++r) mods.emplace_back(C, none);
        std::vector<std::vector<float>> x(xs), y(3), dx(3);
        std::vector<double> fwd_all, bwd_all;
        for (int r = 0; r < 3; ++r) {
            const auto m = mods[static_cast<std::size_t>(r)].forward_message(
                view_of<vf::ndhwc_t>(x[static_cast<std::size_t>(r)].data(), sizes(r)).as_const());
            REQUIRE(m.size() == static_cast<std::size_t>(2 * C + 1));
            fwd_all.insert(fwd_all.end(), m.begin(), m.end());
        }
        for (int r = 0; r < 3; ++r) {
            auto& xr = x[static_cast<std::size_t>(r)];
            auto& yr = y[static_cast<std::size_t>(r)];
            yr.assign(xr.size(), 0.f);
            const auto X = view_of<vf::ndhwc_t>(xr.data(), sizes(r)).as_const();
            const auto Y = view_of<vf::ndhwc_t>(yr.data(), sizes(r));
            auto& m = mods[static_cast<std::size_t>(r)];
            relu ? m.forward_merged(X, Y, fwd_all, vf::relu) : m.forward_merged(X, Y, fwd_all);
        }
        auto bviews = [&](int r) {
            auto& xr = x[static_cast<std::size_t>(r)];
            dx[static_cast<std::size_t>(r)].resize(xr.size());
            return std::tuple{view_of<vf::ndhwc_t>(xr.data(), sizes(r)).as_const(),
                              view_of<vf::ndhwc_t>(dys[static_cast<std::size_t>(r)].data(), sizes(r)).as_const(),
                              view_of<vf::ndhwc_t>(dx[static_cast<std::size_t>(r)].data(), sizes(r))};
        };
        for (int r = 0; r < 3; ++r) {
            auto [X, DY, DX] = bviews(r);
            auto& m = mods[static_cast<std::size_t>(r)];
            const auto msg = relu ? m.backward_message(X, DY, DX, vf::relu) : m.backward_message(X, DY, DX);
            bwd_all.insert(bwd_all.end(), msg.begin(), msg.end());
        }
        for (int r = 0; r < 3; ++r) {
            auto [X, DY, DX] = bviews(r);
            auto& m = mods[static_cast<std::size_t>(r)];
            relu ? m.backward_merged(X, DY, DX, bwd_all, r, vf::relu) : m.backward_merged(X, DY, DX, bwd_all, r);
        }
        for (int r = 0; r < 3; ++r) {
            INFO("relu " << relu << " rank " << r);
            const auto& w = want[static_cast<std::size_t>(r)];
            const auto& m = mods[static_cast<std::size_t>(r)];
            CHECK(same_bits(y[static_cast<std::size_t>(r)], w.y));
            CHECK(same_bits(dx[static_cast<std::size_t>(r)], w.dx));
            CHECK(same_bits(vec(m.running_mean()), w.rm));
            CHECK(same_bits(vec(m.running_var()), w.rv));
            CHECK(same_bits(vec(m.weight_grad()), w.wg));
            CHECK(same_bits(vec(m.bias_grad()), w.bg));
        }
        // Bad gathers and calls out of order throw and change nothing.
        vf::SyncBatchNorm3d<> m(C, none);
        auto& xr = x[0];
        std::vector<float> yr(xr.size(), 7.f);
        const auto X = view_of<vf::ndhwc_t>(xr.data(), sizes(0)).as_const();
        const auto Y = view_of<vf::ndhwc_t>(yr.data(), sizes(0));
        const auto before = vec(m.running_mean());
        std::vector<double> torn(fwd_all.begin(), fwd_all.end() - 1), bad_count(fwd_all);
        bad_count[0] = -1;
        std::vector<double> one{1.0};
        one.resize(static_cast<std::size_t>(2 * C + 1), 0.0);
        CHECK_THROWS_WITH(m.forward_merged(X, Y, torn), Catch::Contains("not a positive multiple of the message size 11"));
        CHECK_THROWS_WITH(m.forward_merged(X, Y, bad_count), Catch::Contains("process 0's message has no valid count"));
        CHECK_THROWS_WITH(m.forward_merged(X, Y, one), Catch::Contains("Expected more than 1 value per channel"));
        CHECK_THROWS_WITH(m.backward_message(X, X, Y), Catch::Contains("was not a training forward over the group"));
        m.eval();
        CHECK_THROWS_WITH(m.forward_message(X), Catch::Contains("eval mode"));
        CHECK(same_bits(vec(m.running_mean()), before));
        CHECK(m.num_batches_tracked() == 0);
        CHECK(std::all_of(yr.begin(), yr.end(), [](float v) { return v == 7.f; }));
    }
}
