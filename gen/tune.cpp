// volfuse_gen --tune's measurements (tune.hpp).  Coordinate search: each op's knob alone
// (forward tile, grad input tile, grad weight tile, then its cache block with the best tile),
// starting from this CPU's default.  A candidate replaces the current value only when it is at
// least 3 % faster (below that, a VM's run-to-run noise decides).
#include "tune.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <ostream>
#include <random>
#include <vector>

#include <volfuse/volfuse.hpp>

namespace volfuse_gen {
namespace {
namespace vf = volfuse;

/// Seconds per call of f: the best of at least 3 calls and 20 ms (at most 10 calls).
double time_once(const std::function<void()>& f)
{
    double best = 1e30, total = 0;
    for (int i = 0; i < 10 && (i < 3 || total < 0.02); ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        f();
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = std::min(best, s);
        total += s;
    }
    return best;
}

std::string text(long v) { return std::to_string(v); }
std::string text(vf::conv_loop v) { return vf::conv_loop_name(v); }
std::string text(vf::conv_split v) { return vf::conv_split_name(v); }

/// Among `values` of one knob (the first is the current one), the fastest by at least 3 %.
/// The candidates are measured in three interleaved rounds (best of each kept), so that a
/// slow spell of the machine does not land on one candidate.
template <class T>
T pick(const char* what, const std::vector<T>& values, vf::conv_schedule base, T vf::conv_schedule::*knob,
       vf::Conv3d<>& conv, const std::function<void()>& run, std::ostream& log, std::string& summary)
{
    std::vector<double> t(values.size(), 1e30);
    run(); // warm-up: workspaces allocated, caches filled
    for (int round = 0; round < 3; ++round)
        for (std::size_t i = 0; i < values.size(); ++i) {
            vf::conv_schedule s = base;
            s.*knob = values[i];
            conv.set_schedule(s);
            t[i] = std::min(t[i], time_once(run));
        }
    std::size_t best = 0;
    for (std::size_t i = 0; i < values.size(); ++i) {
        log << "    " << what << " " << text(values[i]) << ": " << t[i] * 1e3 << " ms\n";
        if (t[i] < t[best] && t[i] < 0.97 * t[0]) best = i;
    }
    char speedup[32];
    std::snprintf(speedup, sizeof speedup, "%.2f", t[0] / t[best]);
    summary += std::string(summary.empty() ? "" : ", ") + what + " " + text(values[best]) +
               (best == 0 ? " (kept)" : " (" + std::string(speedup) + "x " + text(values[0]) + "'s speed)");
    return values[best];
}

/// The current value first, then the others of 1..max_vectors that make a different tile for
/// `channels` (more vectors than the channels fill run the same code).
std::vector<int> vector_candidates(int current, vf::index_t channels)
{
    const int useful = static_cast<int>(std::min<vf::index_t>(vf::conv_max_vectors,
                                                               (channels + vf::simd::width - 1) / vf::simd::width));
    std::vector<int> v{std::min(current, useful)};
    for (int c = useful; c >= 1; --c)
        if (c != v.front()) v.push_back(c);
    return v;
}

} // namespace

tune_result tune(const tune_layer& l, std::ostream& log)
{
    vf::Conv3d<> conv(l.in, l.out, {l.kernel[0], l.kernel[1], l.kernel[2]}, {l.stride[0], l.stride[1], l.stride[2]},
                      {l.padding[0], l.padding[1], l.padding[2]}, {l.dilation[0], l.dilation[1], l.dilation[2]});
    const std::array<vf::index_t, 5> xs{l.batch, l.in, l.extent[0], l.extent[1], l.extent[2]};
    const auto ys = conv.output_sizes(xs);
    auto numel = [](const std::array<vf::index_t, 5>& s) { return s[0] * s[1] * s[2] * s[3] * s[4]; };
    std::vector<float> x(static_cast<std::size_t>(numel(xs))), y(static_cast<std::size_t>(numel(ys))),
        dy(y.size()), dx(x.size());
    std::mt19937 gen(1);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (auto& v : x) v = u(gen);
    for (auto& v : dy) v = u(gen);
    const auto X = vf::ndhwc_view(x.data(), xs);
    const auto Y = vf::ndhwc_view(y.data(), ys);
    const auto dY = vf::ndhwc_view(static_cast<const float*>(dy.data()), ys);
    const auto dX = vf::ndhwc_view(dx.data(), xs);

    vf::conv_schedule s = vf::host_conv_schedule();
    log << "  " << l.name << " [" << xs[0] << ", " << xs[1] << ", " << xs[2] << ", " << xs[3] << ", " << xs[4]
        << "] on " << vf::host_cpu().str() << ", " << vf::simd::arch::name() << ":\n";
    std::string summary;
    s.tile_vectors = pick("forward_vectors", vector_candidates(s.tile_vectors, l.out), s,
                          &vf::conv_schedule::tile_vectors, conv, [&] { conv.forward(X, Y); }, log, summary);
    std::vector<vf::index_t> block_rows{s.forward_block_rows};
    for (vf::index_t b : {32, 64, 96, 128, 192, 256, 100000})
        if (b != s.forward_block_rows) block_rows.push_back(b);
    s.forward_block_rows = pick("forward_block_rows", block_rows, s, &vf::conv_schedule::forward_block_rows, conv,
                                [&] { conv.forward(X, Y); }, log, summary);
    const auto other = [](auto v, auto a, auto b) { return v == a ? b : a; };
    // Loop order and split apply to the forward and to grad input (both formulations): timed together.
    const auto forward_and_grad_input = [&] {
        conv.forward(X, Y);
        conv.backward_input(dY, dX);
    };
    s.forward_loop = pick("forward_loop",
                          std::vector{s.forward_loop,
                                      other(s.forward_loop, vf::conv_loop::rows_outer, vf::conv_loop::channels_outer)},
                          s, &vf::conv_schedule::forward_loop, conv, forward_and_grad_input, log, summary);
    s.forward_split = pick("forward_split",
                           std::vector{s.forward_split,
                                       other(s.forward_split, vf::conv_split::rows, vf::conv_split::channels)},
                           s, &vf::conv_schedule::forward_split, conv, forward_and_grad_input, log, summary);
    s.grad_input_vectors = pick("grad_input_vectors", vector_candidates(s.grad_input_vectors, l.in), s,
                                &vf::conv_schedule::grad_input_vectors, conv, [&] { conv.backward_input(dY, dX); },
                                log, summary);
    s.gw_vectors = pick("gw_vectors", vector_candidates(s.gw_vectors, l.out), s, &vf::conv_schedule::gw_vectors, conv,
                        [&] { conv.backward_weight(X, dY); }, log, summary);
    std::vector<vf::index_t> blocks{s.gw_block_pixels};
    for (vf::index_t b : {64, 128, 256, 512, 1024, 4096})
        if (b != s.gw_block_pixels) blocks.push_back(b);
    s.gw_block_pixels = pick("gw_block_pixels", blocks, s, &vf::conv_schedule::gw_block_pixels, conv,
                             [&] { conv.backward_weight(X, dY); }, log, summary);
    s.gw_split = pick("gw_split", std::vector{s.gw_split, other(s.gw_split, vf::conv_split::rows, vf::conv_split::channels)},
                      s, &vf::conv_schedule::gw_split, conv, [&] { conv.backward_weight(X, dY); }, log, summary);
    return {s.tile_vectors, static_cast<long>(s.forward_block_rows), vf::conv_loop_name(s.forward_loop),
            vf::conv_split_name(s.forward_split), s.grad_input_vectors, s.gw_vectors,
            static_cast<long>(s.gw_block_pixels), vf::conv_split_name(s.gw_split),
            vf::schedule_target(vf::host_cpu().arch), summary};
}

} // namespace volfuse_gen
