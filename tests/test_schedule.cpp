// Conv schedules (schedule/cpu.hpp, schedule/conv_schedule.hpp): CPU classification, the
// per-class defaults, which schedule a layer runs and why (set_schedule, a schedule tuned by
// volfuse_gen --tune, the CPU's default), and that no schedule changes a single bit.
#include "support.hpp"
#include "tune_test.hpp"

using vf::uarch;

TEST_CASE("CPUs are classified by vendor, family and usable AVX-512", "[schedule]")
{
    // (amd, intel, family, avx2, avx512)
    CHECK(vf::classify(true, false, 0x19, true, true) == uarch::zen4);
    CHECK(vf::classify(true, false, 0x19, true, false) == uarch::avx2); // Zen 3: same family, no AVX-512
    CHECK(vf::classify(true, false, 0x1A, true, true) == uarch::zen5);
    CHECK(vf::classify(true, false, 0x17, true, false) == uarch::avx2); // Zen 2
    CHECK(vf::classify(false, true, 6, true, true) == uarch::intel_avx512);
    CHECK(vf::classify(false, true, 6, true, false) == uarch::avx2);
    CHECK(vf::classify(false, false, 0, false, false) == uarch::baseline);
    const auto& cpu = vf::host_cpu();
    CHECK(cpu.arch == vf::classify(cpu.vendor == "AuthenticAMD", cpu.vendor == "GenuineIntel", cpu.family, cpu.avx2,
                                   cpu.avx512));
    // This test binary runs, so the CPU has the ISA it was compiled for.
    if (vf::simd::width == 16) CHECK(cpu.avx512);
    if (vf::simd::width == 8) CHECK(cpu.avx2);
    CHECK(cpu.str().find(vf::uarch_name(cpu.arch)) == 0);
}

TEST_CASE("every CPU class has a default schedule this build can run", "[schedule]")
{
    for (const uarch u : {uarch::baseline, uarch::avx2, uarch::intel_avx512, uarch::zen4, uarch::zen5}) {
        const auto s = vf::conv_schedule_defaults(u);
        INFO(vf::uarch_name(u));
        CHECK(s.same_loops(s.clamped()));
        CHECK(s.origin == std::string("default for ") + vf::uarch_name(u));
        CHECK(s.tuned_for.empty());
        CHECK(s.tile_vectors == vf::conv_max_vectors); // the widest tile: measured best where it was measured
    }
    const auto& host = vf::host_conv_schedule();
    CHECK(host.same_loops(vf::conv_schedule_defaults(vf::host_cpu().arch)));
    CHECK(host.origin.find("(detected: " + vf::host_cpu().str() + ")") != std::string::npos);
    // Out-of-range values are clamped, not trusted.
    vf::conv_schedule wild;
    wild.tile_vectors = 99;
    wild.grad_input_vectors = -3;
    wild.gw_vectors = 0;
    wild.gw_block_pixels = -5;
    wild.forward_block_rows = 0;
    const auto c = wild.clamped();
    CHECK(c.tile_vectors == vf::conv_max_vectors);
    CHECK(c.grad_input_vectors == 1);
    CHECK(c.gw_vectors == 1);
    CHECK(c.gw_block_pixels == 1);
    CHECK(c.forward_block_rows == 1);
}

TEST_CASE("a tuned schedule applies only on the CPU class and ISA it was measured on", "[schedule]")
{
    vf::conv_schedule tuned;
    tuned.tile_vectors = 1;
    tuned.gw_block_pixels = 64;
    tuned.origin = "tuned here";
    tuned.tuned_for = vf::schedule_target(vf::host_cpu().arch);
    const auto here = vf::pick_conv_schedule(&tuned);
    CHECK(here.same_loops(tuned));
    CHECK(here.origin == "tuned here");
    tuned.tuned_for = "zen9/avx1024";
    const auto elsewhere = vf::pick_conv_schedule(&tuned);
    CHECK(elsewhere.same_loops(vf::host_conv_schedule()));
    CHECK(elsewhere.origin.find("the layer's tuned schedule is for zen9/avx1024, not this CPU") != std::string::npos);
    CHECK(vf::pick_conv_schedule(nullptr).same_loops(vf::host_conv_schedule()));
}

TEST_CASE("kernel_choice and describe name the schedule and where it came from", "[schedule]")
{
    std::mt19937 g(3);
    const sizes5 xs{1, 6, 4, 5, 6};
    auto x = randn(numel(xs), g);
    vf::Conv3d<> conv(6, 41, 3, 1, 1); // no generated kernels for this shape
    std::vector<float> y(numel(conv.output_sizes(xs)));
    const auto X = vf::ndhwc_view(x.data(), xs);
    const auto Y = vf::ndhwc_view(y.data(), conv.output_sizes(xs));
    conv.forward(X, Y);
    CHECK(conv.kernel_choice().schedule.origin == vf::host_conv_schedule().origin);
    vf::conv_schedule s;
    s.tile_vectors = 1;
    s.origin = "mine";
    conv.set_schedule(s);
    conv.forward(X, Y);
    CHECK(conv.kernel_choice().schedule.tile_vectors == 1);
    CHECK(conv.kernel_choice().schedule.origin == "set by Conv3d::set_schedule (mine)");
    const std::string d = vf::describe(Y, conv(X));
    CHECK(d.find("tile " + std::to_string(vf::conv_tile_pixels(1)) + " pixels x 1 vectors") != std::string::npos);
    CHECK(d.find(conv.kernel_choice().schedule.str() + ": set by Conv3d::set_schedule (mine)") != std::string::npos);
    CHECK(d.find("kernels: runtime-shaped fallback: no generated kernel for conv in=6 out=41") != std::string::npos);
    conv.reset_schedule();
    conv.forward(X, Y);
    CHECK(conv.kernel_choice().schedule.origin == vf::host_conv_schedule().origin);
}

TEST_CASE("volfuse_gen --tune writes the measured schedule into the registration", "[schedule][gen]")
{
    // tests/tune_test.arch, generated with --tune when the tests were built.
    const vf::registry::key k{vf::registry::op::conv, 6, 40, 3, 1, 1, 1, "ndhwc"};
    const auto c = vf::registry::global().lookup(k);
    REQUIRE(c.specialized);
    REQUIRE(c.found->schedule.has_value());
    const auto& tuned = *c.found->schedule;
    CHECK(tuned.origin.find("tuned by volfuse_gen --tune on " + tuned.tuned_for + " for tune_test.arch:") == 0);
    // The tuner is built for the machine (tune_march); these tests may be built for another ISA,
    // in which case this CPU's default runs and the choice says why.
    if (tuned.tuned_for == vf::schedule_target(vf::host_cpu().arch)) {
        CHECK(tuned.same_loops(tuned.clamped()));
        CHECK(c.schedule.same_loops(tuned));
        CHECK(c.schedule.origin == tuned.origin);
    } else {
        CHECK(c.schedule.same_loops(vf::host_conv_schedule()));
        CHECK(c.schedule.origin.find("tuned schedule is for " + tuned.tuned_for) != std::string::npos);
    }
}

namespace {
struct conv_results {
    std::vector<float> y, y_stats, dx, gw, gb;
};

/// Every kernel of a layer under schedule s (nullptr: the default): forward, the fused
/// block's forward (the forward kernel with its statistics epilogue), grad input, grad weight.
conv_results run_all(const vf::conv_schedule* s, vf::index_t in, vf::index_t out, vf::size3 k, vf::size3 st,
                     vf::size3 p, const sizes5& xs)
{
    std::mt19937 g(17);
    vf::Conv3d<> conv(in, out, k, st, p);
    conv.reset_parameters(5);
    if (s) conv.set_schedule(*s);
    const auto ys = conv.output_sizes(xs);
    auto x = randn(numel(xs), g), dy = randn(numel(ys), g);
    conv_results r;
    r.y.resize(numel(ys));
    r.dx.resize(numel(xs));
    conv.forward(vf::ndhwc_view(x.data(), xs), vf::ndhwc_view(r.y.data(), ys));
    conv.backward(vf::ndhwc_view(x.data(), xs), vf::ndhwc_view(dy.data(), ys), vf::ndhwc_view(r.dx.data(), xs));
    r.gw = vec(conv.weight_grad());
    r.gb = vec(conv.bias_grad());
    vf::ConvBnReLU3d<> block(vf::Conv3d<>(in, out, k, st, p), vf::BatchNorm3d<>(out));
    block.conv().reset_parameters(5);
    if (s) block.conv().set_schedule(*s);
    r.y_stats.resize(numel(ys));
    block.forward(vf::ndhwc_view(x.data(), xs), vf::ndhwc_view(r.y_stats.data(), ys));
    return r;
}
} // namespace

TEST_CASE("schedules change speed, never bits", "[schedule]")
{
    struct layer {
        vf::index_t in, out;
        vf::size3 k, s, p;
        sizes5 xs;
    };
    const layer layers[] = {
        {3, 40, 3, 1, 1, {2, 3, 5, 6, 29}},            // channel tails, rows longer than a tile
        {17, 70, {1, 3, 3}, {1, 2, 2}, {0, 1, 1}, {1, 17, 3, 9, 13}}, // stride 2: grad input scatters
        {20, 9, 2, 1, 0, {1, 20, 3, 4, 30}},
    };
    std::vector<vf::conv_schedule> schedules;
    for (int v = 1; v <= vf::conv_max_vectors; ++v)
        for (vf::index_t block : {1, 64, 100000}) {
            vf::conv_schedule s;
            s.tile_vectors = v;
            s.grad_input_vectors = vf::conv_max_vectors + 1 - v;
            s.gw_vectors = v;
            s.gw_block_pixels = block;
            s.forward_block_rows = block == 1 ? 1 : block == 64 ? 7 : block;
            // Every (loop order, thread split) pair, several times over the tiles and blocks.
            const auto i = schedules.size();
            s.forward_loop = i % 2 ? vf::conv_loop::channels_outer : vf::conv_loop::rows_outer;
            s.forward_split = i / 2 % 2 ? vf::conv_split::channels : vf::conv_split::rows;
            s.gw_split = i / 4 % 2 ? vf::conv_split::channels : vf::conv_split::rows;
            schedules.push_back(s);
        }
    const int threads = vf::get_num_threads();
    for (const auto& l : layers) {
        const auto ref = run_all(nullptr, l.in, l.out, l.k, l.s, l.p, l.xs);
        for (const auto& s : schedules) {
            // 1 and 2 threads in turn: the channel split writes a block's statistics from
            // several tasks, and both grad-weight splits give threads other tiles.
            vf::set_num_threads(1 + static_cast<int>(&s - schedules.data()) % 2);
            INFO("in " << l.in << " out " << l.out << ", " << vf::get_num_threads() << " threads: " << s.str());
            const auto r = run_all(&s, l.in, l.out, l.k, l.s, l.p, l.xs);
            CHECK(same_bits(r.y, ref.y));
            CHECK(same_bits(r.y_stats, ref.y_stats));
            CHECK(same_bits(r.dx, ref.dx));
            CHECK(same_bits(r.gw, ref.gw));
            CHECK(same_bits(r.gb, ref.gb));
        }
    }
    vf::set_num_threads(threads);
}
