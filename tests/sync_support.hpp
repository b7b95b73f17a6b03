// SyncBatchNorm3d scenarios shared by the in-process test (ranks as threads over a fake
// communicator) and the MPI test (ranks as processes under mpirun): every rank builds the same
// global batch from a seed, runs its part through SyncBatchNorm3d, and BatchNorm3d on the whole
// global batch as the reference; checks compare the two.
#pragma once

#include <barrier>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "support.hpp"

/// One scenario: a global batch split over ranks (samples per rank, any may be 0).
struct sync_scenario {
    std::vector<index_t> split; // samples per rank
    index_t C, D, H, W;
    bool relu, affine, track;
    std::optional<double> momentum;
    bool ndhwc;
    unsigned seed;
    double mean = 3.0, stddev = 2.0; // the data's; hard data: mean = 1e4 std


    index_t global_n() const
    {
        index_t n = 0;
        for (index_t s : split) n += s;
        return n;
    }
    sizes5 global_sizes() const { return {global_n(), C, D, H, W}; }
    sizes5 local_sizes(int r) const { return {split[static_cast<std::size_t>(r)], C, D, H, W}; }
    index_t first_sample(int r) const
    {
        index_t n = 0;
        for (int q = 0; q < r; ++q) n += split[static_cast<std::size_t>(q)];
        return n;
    }
    std::string str() const
    {
        std::string s = "split [";
        for (std::size_t i = 0; i < split.size(); ++i) {
            if (i) s += ",";
            s += std::to_string(split[i]);
        }
        s += "] C " + std::to_string(C) + " DHW " + std::to_string(D) + "x" + std::to_string(H) + "x" + std::to_string(W) +
             (relu ? " relu" : "") + (affine ? " affine" : "") + (track ? " track" : "") +
             (momentum ? " momentum " + std::to_string(*momentum) : " momentum None") + (ndhwc ? " ndhwc" : " ncdhw") +
             " data mean " + std::to_string(mean) + " std " + std::to_string(stddev);
        return s;
    }
};

/// What one rank observed, and the global BatchNorm3d's results restricted to its part.
struct sync_observed {
    struct step {
        std::vector<float> y, dx;          // this rank's part (logical NCDHW order)
        std::vector<float> ref_y, ref_dx;  // BatchNorm3d on the global batch, this rank's part
        std::vector<float> running_mean, running_var, ref_running_mean, ref_running_var;
        std::vector<float> weight_grad, bias_grad, ref_weight_grad, ref_bias_grad; // local vs global
        std::int64_t nbt = 0, ref_nbt = 0;
        bool local_ref = false; // eval without running statistics: each rank's own batch (PyTorch's rule)
    };
    std::vector<step> steps; // train, train, eval
    std::vector<float> x_global, dy_global;
    std::vector<float> weight, bias; // the affine parameters used (empty without affine)
    int rank = 0;
};

inline std::vector<float> part(const std::vector<float>& global, const sync_scenario& sc, int r)
{
    const index_t per = sc.C * sc.D * sc.H * sc.W;
    const auto b = global.begin() + sc.first_sample(r) * per;
    return std::vector<float>(b, b + sc.split[static_cast<std::size_t>(r)] * per);
}

template <class L, class Comm>
sync_observed run_sync_scenario_in(const sync_scenario& sc, Comm& comm)
{
    const int r = comm.rank();
    std::mt19937 g(sc.seed);
    sync_observed o;
    const sizes5 gs = sc.global_sizes(), ls = sc.local_sizes(r);
    o.x_global = randn(numel(gs), g, sc.mean, sc.stddev);
    std::vector<std::vector<float>> dys;
    vf::SyncBatchNorm3d<> sbn(sc.C, comm, 1e-5, sc.momentum, sc.affine, sc.track);
    vf::BatchNorm3d<> bn(sc.C, 1e-5, sc.momentum, sc.affine, sc.track);
    if (sc.affine) {
        std::uniform_real_distribution<float> u(0.5f, 1.5f);
        for (index_t c = 0; c < sc.C; ++c) {
            const float w = u(g), b = u(g) - 1.f;
            sbn.weight()[c] = bn.weight()[c] = w;
            sbn.bias()[c] = bn.bias()[c] = b;
        }
        o.weight = vec(bn.weight());
        o.bias = vec(bn.bias());
    }
    o.rank = r;
    const auto x_local = part(o.x_global, sc, r);
    for (int k = 0; k < 3; ++k) {
        const bool train = k < 2;
        sbn.train(train);
        bn.train(train);
        sbn.zero_grad();
        bn.zero_grad();
        const auto dy_global = randn(numel(gs), g);
        sync_observed::step s;
        bn_run<L> mine(x_local, ls), whole(o.x_global, gs);
        s.y = mine.forward(sbn, sc.relu);
        s.dx = mine.backward(sbn, part(dy_global, sc, r), sc.relu);
        s.local_ref = !train && !sc.track;
        if (s.local_ref) {
            bn_run<L> alone(x_local, ls);
            s.ref_y = alone.forward(bn, sc.relu);
            s.ref_dx = alone.backward(bn, part(dy_global, sc, r), sc.relu);
        } else {
            const auto gy = whole.forward(bn, sc.relu);
            const auto gdx = whole.backward(bn, dy_global, sc.relu);
            s.ref_y = part(gy, sc, r);
            s.ref_dx = part(gdx, sc, r);
        }
        s.running_mean = vec(sbn.running_mean());
        s.running_var = vec(sbn.running_var());
        s.ref_running_mean = vec(bn.running_mean());
        s.ref_running_var = vec(bn.running_var());
        s.weight_grad = vec(sbn.weight_grad());
        s.bias_grad = vec(sbn.bias_grad());
        s.ref_weight_grad = vec(bn.weight_grad());
        s.ref_bias_grad = vec(bn.bias_grad());
        s.nbt = sbn.num_batches_tracked();
        s.ref_nbt = bn.num_batches_tracked();
        o.steps.push_back(std::move(s));
        if (k == 1) o.dy_global = dy_global;
    }
    return o;
}

template <class Comm>
sync_observed run_sync_scenario(const sync_scenario& sc, Comm& comm)
{
    return sc.ndhwc ? run_sync_scenario_in<vf::ndhwc_t>(sc, comm) : run_sync_scenario_in<vf::ncdhw_t>(sc, comm);
}

/// Checks one rank's observations (Catch2 assertions: call on the thread that runs Catch2).
/// `grad_sum`: the weight/bias grads summed over ranks (what DDP's all-reduce gives).
inline void check_sync_observed(const sync_scenario& sc, const sync_observed& o,
                                const std::vector<std::vector<float>>* grad_sum_w = nullptr,
                                const std::vector<std::vector<float>>* grad_sum_b = nullptr)
{
    for (std::size_t k = 0; k < o.steps.size(); ++k) {
        const auto& s = o.steps[k];
        INFO(sc.str() << " step " << k);
        REQUIRE(s.y.size() == s.ref_y.size());
        // Same statistics up to the merge order: y within a few float roundings of O(1) values.
        for (std::size_t i = 0; i < s.y.size(); ++i)
            CHECK_NEAR(s.y[i], s.ref_y[i], 8 * eps_f * (std::abs(s.ref_y[i]) + 1));
        double dmax = 1e-30;
        for (float v : s.ref_dx) dmax = std::max(dmax, static_cast<double>(std::abs(v)));
        for (std::size_t i = 0; i < s.dx.size(); ++i) CHECK_NEAR(s.dx[i], s.ref_dx[i], 1e-5 * dmax);
        for (std::size_t c = 0; c < s.running_mean.size(); ++c) {
            CHECK_NEAR(s.running_mean[c], s.ref_running_mean[c], 4 * eps_f * (std::abs(s.ref_running_mean[c]) + 1));
            CHECK_NEAR(s.running_var[c], s.ref_running_var[c], 4 * eps_f * std::abs(s.ref_running_var[c]));
        }
        CHECK(s.nbt == s.ref_nbt);
        if (s.local_ref)
            for (std::size_t c = 0; c < s.ref_weight_grad.size(); ++c) {
                CHECK_NEAR(s.weight_grad[c], s.ref_weight_grad[c], 1e-6 * (std::abs(s.ref_weight_grad[c]) + 1));
                CHECK_NEAR(s.bias_grad[c], s.ref_bias_grad[c], 1e-6 * (std::abs(s.ref_bias_grad[c]) + 1));
            }
        else if (grad_sum_w)
            for (std::size_t c = 0; c < s.ref_weight_grad.size(); ++c) {
                const double n = static_cast<double>(sc.global_n() * sc.D * sc.H * sc.W);
                CHECK_NEAR((*grad_sum_w)[k][c], s.ref_weight_grad[c], 1e-5 * std::sqrt(n) * (std::abs(s.ref_weight_grad[c]) + 1));
                CHECK_NEAR((*grad_sum_b)[k][c], s.ref_bias_grad[c], 1e-5 * std::sqrt(n) * (std::abs(s.ref_bias_grad[c]) + 1));
            }
    }
}

/// The first (training) step's output against an independent reference: the float64 batch
/// norm of the whole global batch (support.hpp), restricted to this rank's part.
inline void check_sync_against_float64(const sync_scenario& sc, const sync_observed& o)
{
    const sizes5 gs = sc.global_sizes();
    reference ref;
    ref.forward(o.x_global, gs, o.weight, o.bias, true, {}, {}, 1e-5, sc.relu);
    const index_t first = sc.first_sample(o.rank) * sc.C * sc.D * sc.H * sc.W;
    const auto& y = o.steps.at(0).y;
    INFO(sc.str() << " rank " << o.rank << ": against float64");
    for (std::size_t i = 0; i < y.size(); ++i) {
        const index_t gi = first + static_cast<index_t>(i);
        const index_t c = (gi / (sc.D * sc.H * sc.W)) % sc.C;
        CHECK_NEAR(y[i], ref.y[static_cast<std::size_t>(gi)], ref.bound(o.x_global, o.weight, o.bias, c, gi));
    }
}

/// The scenarios every transport runs with P ranks: uneven splits, a rank with no samples
/// (P >= 2), both layouts, relu or not, momentum or None, affine or not, tracking or not.
inline std::vector<sync_scenario> sync_scenarios(int P)
{
    std::vector<sync_scenario> out;
    std::vector<std::vector<index_t>> splits;
    std::vector<index_t> even(static_cast<std::size_t>(P), 2), uneven, with_zero;
    for (int r = 0; r < P; ++r) uneven.push_back(1 + r % 3);
    for (int r = 0; r < P; ++r) with_zero.push_back(r == P / 2 && P > 1 ? 0 : 1 + (r % 2));
    splits = {even, uneven, with_zero};
    unsigned seed = 100;
    for (const auto& sp : splits)
        for (const bool ndhwc : {false, true})
            for (const bool relu : {false, true}) {
                const bool affine = (seed % 3) != 0, track = (seed % 4) != 1;
                const std::optional<double> m = (seed % 2) ? std::optional<double>(0.1) : std::nullopt;
                const index_t C = relu ? 17 : 5;
                out.push_back({sp, C, 3, 4, ndhwc ? 5 : 7, relu, affine, track, m, ndhwc, seed++});
            }
    // Hard data: a mean 1e4 times the standard deviation (E[x^2] - E[x]^2 would lose everything),
    // split unevenly with an empty rank.
    for (const bool ndhwc : {false, true})
        out.push_back({with_zero, 4, 4, 3, 6, !ndhwc, true, true, 0.1, ndhwc, seed++, 2e4, 2.0});
    return out;
}
