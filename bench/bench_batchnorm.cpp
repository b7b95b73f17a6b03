// BatchNorm3d(+ReLU) micro-benchmarks on the seed's shapes: forward train/eval,
// with and without the fused ReLU, backward, per layout, static vs dynamic C.
// Each kernel is reported in bytes/s of its minimal DRAM traffic (forward: read x,
// write y = 8 B/element; backward: read x and dy, write dx = 12 B/element) next to a
// roofline of the same size measured in the same run: a copy with non-temporal stores
// (read a, write b, no read-for-ownership) for out-of-place ops, an in-place read+write of one array for in-place ones.
// At the end a table summarizes time, GB/s and % of the roofline.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <volfuse/volfuse.hpp>

#include "report.hpp"
#include "roofline.hpp"

namespace vf = volfuse;
using vf::index_t;

namespace {

using sizes5 = std::array<index_t, 5>;
const std::vector<sizes5> shapes = {
    {8, 32, 8, 16, 16},    // cache-resident (4 MiB per tensor)
    {4, 64, 32, 32, 32},   // seed: bn_standard's volume
    {2, 64, 64, 64, 64},   // seed: frozen-BN fine-tuning volume
    {8, 64, 16, 112, 112}, // seed: the video net's first conv output
};

std::string shape_str(const sizes5& s)
{
    return std::to_string(s[0]) + "x" + std::to_string(s[1]) + "x" + std::to_string(s[2]) + "x" +
           std::to_string(s[3]) + "x" + std::to_string(s[4]);
}
index_t numel(const sizes5& s) { return s[0] * s[1] * s[2] * s[3] * s[4]; }

/// Page-aligned, first-touched buffers, allocated once per shape and shared by all benchmarks.
struct buffers {
    std::unique_ptr<float[], void (*)(void*)> x{nullptr, std::free}, y{nullptr, std::free}, dy{nullptr, std::free},
        dx{nullptr, std::free};
};
float* alloc_random(index_t n, unsigned seed, float mean)
{
    auto* p = static_cast<float*>(std::aligned_alloc(4096, (static_cast<std::size_t>(n) * 4 + 4095) / 4096 * 4096));
    std::mt19937 g(seed);
    std::normal_distribution<float> nd(mean, 1.f);
    // A short random pattern repeated: realistic values without minutes of RNG on 100M elements.
    std::vector<float> pattern(4099);
    for (auto& v : pattern) v = nd(g);
    for (index_t i = 0; i < n; ++i) p[i] = pattern[static_cast<std::size_t>(i % 4099)];
    return p;
}
buffers& get(const sizes5& s)
{
    static std::map<sizes5, buffers> cache;
    auto it = cache.find(s);
    if (it != cache.end()) return it->second;
    if (!cache.empty()) cache.clear(); // benchmarks run shape by shape: keep one shape resident
    buffers& b = cache[s];
    const index_t n = numel(s);
    b.x.reset(alloc_random(n, 1, 0.5f));
    b.y.reset(alloc_random(n, 2, 0.f));
    b.dy.reset(alloc_random(n, 3, 0.f));
    b.dx.reset(alloc_random(n, 4, 0.f));
    return b;
}

enum class op { train, train_relu, train_relu_inplace, eval, eval_relu, eval_relu_inplace, backward, backward_relu };
const char* op_name(op o)
{
    switch (o) {
    case op::train: return "fwd_train";
    case op::train_relu: return "fwd_train_relu";
    case op::train_relu_inplace: return "fwd_train_relu_inplace";
    case op::eval_relu_inplace: return "fwd_eval_relu_inplace";
    case op::eval: return "fwd_eval";
    case op::eval_relu: return "fwd_eval_relu";
    case op::backward: return "bwd";
    case op::backward_relu: return "bwd_relu";
    }
    return "";
}
bool has_relu(op o)
{
    return o == op::train_relu || o == op::train_relu_inplace || o == op::eval_relu || o == op::eval_relu_inplace ||
           o == op::backward_relu;
}
bool in_place(op o) { return o == op::train_relu_inplace || o == op::eval_relu_inplace; }

void set_rate(benchmark::State& st, double bytes_per_iter)
{
    st.counters["GB/s"] = benchmark::Counter(bytes_per_iter * static_cast<double>(st.iterations()),
                                             benchmark::Counter::kIsRate, benchmark::Counter::OneK::kIs1000);
    st.counters["bytes"] = bytes_per_iter;
}

template <class L, index_t SC>
void bm_bn(benchmark::State& st, sizes5 s, op o)
{
    auto& b = get(s);
    vf::BatchNorm3d<SC> bn(s[1]);
    auto X = vf::make_view<L>(b.x.get(), s[0], s[1], s[2], s[3], s[4]);
    auto Y = vf::make_view<L>(b.y.get(), s[0], s[1], s[2], s[3], s[4]);
    auto DY = vf::make_view<L>(b.dy.get(), s[0], s[1], s[2], s[3], s[4]);
    auto DX = vf::make_view<L>(b.dx.get(), s[0], s[1], s[2], s[3], s[4]);
    const bool relu = has_relu(o);
    auto fwd = [&] {
        if (in_place(o)) bn.forward(Y, Y, vf::relu); // Y holds finite data from the previous iteration
        else if (relu) bn.forward(X, Y, vf::relu);
        else bn.forward(X, Y);
    };
    if (o == op::eval || o == op::eval_relu || o == op::eval_relu_inplace) bn.eval();
    if (o == op::backward || o == op::backward_relu) fwd();
    for (auto _ : st) {
        switch (o) {
        case op::backward:
        case op::backward_relu:
            if (relu) bn.backward(X, DY, DX, vf::relu);
            else bn.backward(X, DY, DX);
            break;
        default: fwd();
        }
        benchmark::ClobberMemory();
    }
    const double n = static_cast<double>(numel(s));
    set_rate(st, (o == op::backward || o == op::backward_relu ? 12.0 : 8.0) * n);
}

void bm_inplace(benchmark::State& st, sizes5 s)
{
    auto& b = get(s);
    for (auto _ : st) {
        roofline::inplace(b.y.get(), numel(s), vf::get_num_threads());
        benchmark::ClobberMemory();
    }
    set_rate(st, 8.0 * static_cast<double>(numel(s)));
}

void bm_ntcopy(benchmark::State& st, sizes5 s)
{
    auto& b = get(s);
    for (auto _ : st) {
        roofline::ntcopy(b.x.get(), b.y.get(), numel(s), vf::get_num_threads());
        benchmark::ClobberMemory();
    }
    set_rate(st, 8.0 * static_cast<double>(numel(s)));
}

/// A statistics pass's floor: the array summed in double once (from DRAM), and a
/// 512 KiB slice summed numel/slice times (the same element count from L2), both
/// reported as 4 B/element read.  The second is bound by the float->double widening.
void bm_dsum(benchmark::State& st, sizes5 s, bool cached)
{
    auto& b = get(s);
    const index_t n = numel(s), slice = std::min<index_t>(n, 128 * 1024);
    for (auto _ : st)
        benchmark::DoNotOptimize(cached ? roofline::dsum(b.x.get(), slice, vf::get_num_threads(), n / slice)
                                        : roofline::dsum(b.x.get(), n, vf::get_num_threads()));
    set_rate(st, 4.0 * static_cast<double>(cached ? n / slice * slice : n));
}

/// Collects the runs and prints the summary table after Google Benchmark's own output.
class table_reporter : public report::collecting {
public:
    void Finalize() override
    {
        ConsoleReporter::Finalize();
        std::map<std::string, double> copy_gbs, inplace_gbs, dsum_ms, dsum_cached_ms;
        using report::name_of;
        for (const auto& r : rows_) {
            const auto name = name_of(r);
            if (name.rfind("ntcopy/", 0) == 0) copy_gbs[name.substr(7)] = r.counters.at("GB/s").value / 1e9;
            if (name.rfind("inplace/", 0) == 0) inplace_gbs[name.substr(8)] = r.counters.at("GB/s").value / 1e9;
            const double ms = report::ms_of(r);
            if (name.rfind("dsum/", 0) == 0) dsum_ms[name.substr(5)] = ms;
            if (name.rfind("dsum_cached/", 0) == 0) dsum_cached_ms[name.substr(12)] = ms;
        }
        std::printf("\nvolfuse BatchNorm3d, %d thread(s), fp32.  GB/s counts minimal traffic (fwd 8 B, bwd 12 B per "
                    "element).\nroofline: for in-place ops, reading and writing one array of the same size; for\n"
                    "the others, a copy of the same size with non-temporal stores; both measured in this run\n"
                    "with the same number of threads.\n\n",
                    vf::get_num_threads());
        std::printf("%-15s %-6s %-4s %-22s %10s %8s %11s\n", "shape", "layout", "C", "op", "time ms", "GB/s",
                    "% roofline");
        bool missing_roofline = false;
        for (const auto& r : rows_) {
            const auto name = name_of(r);
            if (name.rfind("bn/", 0) != 0) continue;
            // bn/<shape>/<layout>/<C>/<op>
            std::vector<std::string> part;
            std::size_t pos = 0, next;
            while ((next = name.find('/', pos)) != std::string::npos) {
                part.push_back(name.substr(pos, next - pos));
                pos = next + 1;
            }
            part.push_back(name.substr(pos));
            const double gbs = r.counters.at("GB/s").value / 1e9;
            const double ms = report::ms_of(r);
            const auto& roof = part[4].find("inplace") != std::string::npos ? inplace_gbs : copy_gbs;
            const auto c = roof.find(part[1]);
            char pct[32] = "no roofline*";
            if (c != roof.end()) std::snprintf(pct, sizeof pct, "%.0f%%", 100.0 * gbs / c->second);
            else missing_roofline = true;
            std::printf("%-15s %-6s %-4s %-22s %10.3f %8.2f %11s\n", part[1].c_str(), part[2].c_str(),
                        part[3].c_str(), part[4].c_str(), ms, gbs, pct);
        }
        if (missing_roofline)
            std::printf("* the roofline rows of that shape did not run (a --benchmark_filter left them out: add "
                        "ntcopy/<shape> and inplace/<shape> to it)\n");
        for (const auto& [shape, gbs] : copy_gbs)
            std::printf("roofline %-15s nt copy %6.2f GB/s, in place %6.2f GB/s; double sum %.3f ms (whole array), %.3f ms (512 KiB slice)\n",
                        shape.c_str(), gbs, inplace_gbs[shape], dsum_ms[shape], dsum_cached_ms[shape]);
    }

};

/// Every benchmark: wall time (threads) and a short warm-up (page-in, caches).
template <class... A>
void add(const std::string& name, A&&... a)
{
    report::add(name, 0.05, 1, std::forward<A>(a)...);
}

template <class L>
void register_layout(const sizes5& s, const std::string& layout)
{
    const op ops[] = {op::train,     op::train_relu,        op::train_relu_inplace, op::eval,
                      op::eval_relu, op::eval_relu_inplace, op::backward,           op::backward_relu};
    for (op o : ops) {
        const std::string base = "bn/" + shape_str(s) + "/" + layout + "/";
        // Static C rows for the channel counts compiled in (the seed's); any C runs runtime-shaped.
        if (s[1] == 64) add(base + "64/" + op_name(o), bm_bn<L, 64>, s, o);
        else if (s[1] == 32) add(base + "32/" + op_name(o), bm_bn<L, 32>, s, o);
        add(base + "dyn/" + op_name(o), bm_bn<L, vf::dynamic>, s, o);
    }
}

} // namespace

int main(int argc, char** argv)
{
    // --threads=N (default 1): threads for the kernels and for the rooflines; --smoke.
    // --shape=N,C,D,H,W (repeatable): these shapes instead of the seed's.
    const report::flags& f = report::take_flags(argc, argv, /*accepts_shape*/ true);
    vf::set_num_threads(f.threads);
    std::vector<sizes5> chosen = shapes;
    if (!f.shapes.empty()) {
        chosen.clear();
        for (const auto& u : f.shapes) chosen.push_back({u[0], u[1], u[2], u[3], u[4]});
    }
    for (const auto& s : chosen) {
        add("ntcopy/" + shape_str(s), bm_ntcopy, s);
        add("inplace/" + shape_str(s), bm_inplace, s);
        add("dsum/" + shape_str(s), bm_dsum, s, false);
        add("dsum_cached/" + shape_str(s), bm_dsum, s, true);
        register_layout<vf::ncdhw_t>(s, "ncdhw");
        register_layout<vf::ndhwc_t>(s, "ndhwc");
    }
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    table_reporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    benchmark::Shutdown();
}
