// volfuse, oneDNN 2.6 and libtorch 1.13 side by side, in one process, on the seed's
// BatchNorm3d(+ReLU) shapes: forward train + ReLU and forward eval + ReLU in place (the
// case after a conv), backward through ReLU; 1 and 2 threads; ncdhw, ndhwc and nCdhw16c
// for volfuse and oneDNN, ncdhw for libtorch (its channels_last_3d path is generic in 1.13).
// Rooflines (bench/roofline.hpp: in-place read+write of one array, non-temporal copy) are
// measured in the same run with the same threads.  Built when meson finds Debian's
// libdnnl-dev and libtorch-dev (option `peers`).
//
// Peers as their users run them:
//   oneDNN: batch_normalization primitive, use_scale_shift | fuse_norm_relu (training also
//           writes its 1-bit ReLU workspace), src == dst; primitive only, no reorders.
//   libtorch: at::native_batch_norm (what nn.BatchNorm3d calls; 1.13 has no CPU .out kernel),
//           then relu_() (nn.ReLU(inplace=True)); backward = threshold_backward then
//           native_batch_norm_backward.  libtorch allocates its outputs per call; a caching
//           CPU allocator (as PyTorch's GPU one) recycles them, so what is timed is the
//           kernels, not page faults on fresh memory.
#include <omp.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <benchmark/benchmark.h>
#include <dnnl.hpp>
#include <volfuse/volfuse.hpp>

#include "peers_common.hpp"
#include "report.hpp"
#include "roofline.hpp"

namespace vf = volfuse;
using vf::index_t;

namespace {

using peers::set_threads;
using sizes5 = std::array<index_t, 5>;
const std::vector<sizes5> shapes = {
    {8, 32, 8, 16, 16}, {4, 64, 32, 32, 32}, {2, 64, 64, 64, 64}, {8, 64, 16, 112, 112}};
enum class op { train, eval, backward };
const char* op_name(op o) { return o == op::train ? "fwd_train_relu" : o == op::eval ? "fwd_eval_relu" : "bwd_relu"; }

std::string shape_str(const sizes5& s)
{
    return std::to_string(s[0]) + "x" + std::to_string(s[1]) + "x" + std::to_string(s[2]) + "x" +
           std::to_string(s[3]) + "x" + std::to_string(s[4]);
}
index_t numel(const sizes5& s) { return s[0] * s[1] * s[2] * s[3] * s[4]; }

/// x, y, dy, dx for the current shape (one shape resident at a time).
struct buffers {
    sizes5 s{};
    std::vector<float, roofline::page_aligned<float>> x, y, dy, dx;
};
buffers& get(const sizes5& s)
{
    static buffers b;
    if (b.s != s) {
        b = {};
        b.s = s;
        const auto n = static_cast<std::size_t>(numel(s));
        std::vector<float> pattern(4099);
        for (std::size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<float>((i * 7919) % 4099) / 2049.f - 1.f;
        for (auto* v : {&b.x, &b.y, &b.dy, &b.dx}) {
            v->resize(n);
            for (std::size_t i = 0; i < n; ++i) (*v)[i] = pattern[i % pattern.size()];
        }
    }
    return b;
}

void rate(benchmark::State& st, double bytes)
{
    st.counters["GB/s"] = benchmark::Counter(bytes * static_cast<double>(st.iterations()), benchmark::Counter::kIsRate,
                                             benchmark::Counter::OneK::kIs1000);
}
double traffic(op o, const sizes5& s) { return (o == op::backward ? 12.0 : 8.0) * static_cast<double>(numel(s)); }

// --- rooflines ---------------------------------------------------------------------
void roof_inplace(benchmark::State& st, sizes5 s, int t)
{
    set_threads(t);
    auto& b = get(s);
    for (auto _ : st) {
        roofline::inplace(b.y.data(), numel(s), t);
        benchmark::ClobberMemory();
    }
    rate(st, 8.0 * static_cast<double>(numel(s)));
}
void roof_ntcopy(benchmark::State& st, sizes5 s, int t)
{
    set_threads(t);
    auto& b = get(s);
    for (auto _ : st) {
        roofline::ntcopy(b.x.data(), b.y.data(), numel(s), t);
        benchmark::ClobberMemory();
    }
    rate(st, 8.0 * static_cast<double>(numel(s)));
}

// --- volfuse -------------------------------------------------------------------------
template <class L, index_t C>
void run_volfuse(benchmark::State& st, sizes5 s, int t, op o)
{
    set_threads(t);
    auto& b = get(s);
    vf::BatchNorm3d<C> bn(C);
    auto X = vf::make_view<L>(b.x.data(), s[0], s[1], s[2], s[3], s[4]);
    auto Y = vf::make_view<L>(b.y.data(), s[0], s[1], s[2], s[3], s[4]);
    auto DY = vf::make_view<L>(b.dy.data(), s[0], s[1], s[2], s[3], s[4]);
    auto DX = vf::make_view<L>(b.dx.data(), s[0], s[1], s[2], s[3], s[4]);
    if (o == op::eval) bn.eval();
    if (o == op::backward) bn.forward(X, Y, vf::relu);
    for (auto _ : st) {
        if (o == op::backward) bn.backward(X, DY, DX, vf::relu);
        else bn.forward(Y, Y, vf::relu); // in place
        benchmark::ClobberMemory();
    }
    rate(st, traffic(o, s));
}

// --- oneDNN --------------------------------------------------------------------------
void run_onednn(benchmark::State& st, sizes5 s, int t, op o, dnnl::memory::format_tag tag)
{
    using namespace dnnl;
    set_threads(t);
    auto& b = get(s);
    engine eng(engine::kind::cpu, 0);
    stream strm(eng);
    const memory::desc md({s[0], s[1], s[2], s[3], s[4]}, memory::data_type::f32, tag);
    const auto flags = normalization_flags::use_scale_shift | normalization_flags::fuse_norm_relu |
                       (o == op::eval ? normalization_flags::use_global_stats : normalization_flags::none);
    const auto kind = o == op::eval ? prop_kind::forward_inference : prop_kind::forward_training;
    batch_normalization_forward::primitive_desc fpd({kind, md, 1e-5f, flags}, eng);
    memory src(md, eng, b.x.data()), dst(md, eng, b.y.data()), inplace(md, eng, b.y.data());
    memory mean(fpd.mean_desc(), eng), var(fpd.variance_desc(), eng), ss(fpd.weights_desc(), eng);
    std::fill_n(static_cast<float*>(ss.get_data_handle()), 2 * s[1], 1.f);
    std::fill_n(static_cast<float*>(var.get_data_handle()), s[1], 1.f);
    std::fill_n(static_cast<float*>(mean.get_data_handle()), s[1], 0.f);
    memory ws = o == op::eval ? memory() : memory(fpd.workspace_desc(), eng);
    batch_normalization_forward fwd(fpd);
    auto fwd_args = [&](memory& in, memory& out) {
        std::unordered_map<int, memory> a{{DNNL_ARG_SRC, in}, {DNNL_ARG_DST, out}, {DNNL_ARG_MEAN, mean},
                                          {DNNL_ARG_VARIANCE, var}, {DNNL_ARG_SCALE_SHIFT, ss}};
        if (o != op::eval) a[DNNL_ARG_WORKSPACE] = ws;
        return a;
    };
    if (o == op::backward) {
        fwd.execute(strm, fwd_args(src, dst));
        batch_normalization_backward::primitive_desc bpd(
            {prop_kind::backward, md, md, 1e-5f, normalization_flags::use_scale_shift | normalization_flags::fuse_norm_relu},
            eng, fpd);
        memory ddst(md, eng, b.dy.data()), dsrc(md, eng, b.dx.data()), dss(bpd.diff_weights_desc(), eng);
        batch_normalization_backward bwd(bpd);
        for (auto _ : st) {
            bwd.execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_MEAN, mean}, {DNNL_ARG_VARIANCE, var},
                               {DNNL_ARG_DIFF_DST, ddst}, {DNNL_ARG_SCALE_SHIFT, ss}, {DNNL_ARG_WORKSPACE, ws},
                               {DNNL_ARG_DIFF_SRC, dsrc}, {DNNL_ARG_DIFF_SCALE_SHIFT, dss}});
            strm.wait();
        }
    } else {
        for (auto _ : st) {
            fwd.execute(strm, fwd_args(inplace, inplace));
            strm.wait();
        }
    }
    rate(st, traffic(o, s));
}

// --- libtorch ------------------------------------------------------------------------
void run_torch_impl(benchmark::State& st, sizes5 s, int t, op o);
void run_torch(benchmark::State& st, sizes5 s, int t, op o)
{
    run_torch_impl(st, s, t, o);
    peers::caching_allocator::trim(); // every tensor of this benchmark is gone: give the memory back
}
void run_torch_impl(benchmark::State& st, sizes5 s, int t, op o)
{
    set_threads(t);
    const int64_t C = s[1];
    auto x = at::randn({s[0], s[1], s[2], s[3], s[4]});
    auto y = at::empty_like(x), dy = at::randn_like(x);
    auto w = at::ones({C}), bias = at::zeros({C}), rm = at::zeros({C}), rv = at::ones({C});
    at::Tensor sm, si;
    const bool train = o != op::eval;
    if (o == op::backward) {
        auto f = at::native_batch_norm(x, w, bias, rm, rv, true, 0.1, 1e-5);
        y = std::get<0>(f).relu_();
        sm = std::get<1>(f);
        si = std::get<2>(f);
        for (auto _ : st) {
            auto g = at::threshold_backward(dy, y, 0);
            auto r = at::native_batch_norm_backward(g, x, w, rm, rv, sm, si, true, 1e-5, {true, true, true});
            benchmark::DoNotOptimize(std::get<0>(r).data_ptr());
        }
    } else {
        for (auto _ : st) {
            auto f = at::native_batch_norm(x, w, bias, rm, rv, train, 0.1, 1e-5);
            benchmark::DoNotOptimize(std::get<0>(f).relu_().data_ptr());
        }
    }
    rate(st, traffic(o, s));
}

/// Prints, per shape/threads/op, every implementation's time and the ratios the targets use.
class table_reporter : public report::collecting {
public:
    void Finalize() override
    {
        ConsoleReporter::Finalize();
        std::printf("\nBatchNorm3d(+ReLU) peers, fp32, times in ms (lower is better).  roofline: in-place read+write\n"
                    "of one array for the forward ops, non-temporal copy (read a, write b) + a read for backward\n(12 B/element).\n\n");
        std::printf("%-16s %-3s %-15s %8s %8s %8s %8s %8s %8s %8s %8s %8s %9s %9s\n", "shape", "thr", "op", "roofline",
                    "vf_ncdhw", "vf_ndhwc", "vf_16c", "dnnl_nc", "dnnl_nd", "dnnl_16c", "torch", "vf/roof", "dnnl/vf",
                    "torch/vf");
        for (const auto& s : shapes)
            for (int t : {1, 2})
                for (op o : {op::train, op::eval, op::backward}) {
                    const std::string base = "peers/" + shape_str(s) + "/" + std::to_string(t) + "T/";
                    auto get = [&](const std::string& k) {
                        const auto it = ms_.find(base + k);
                        return it == ms_.end() ? 0.0 : it->second;
                    };
                    const double roof = o == op::backward ? get("roofline_ntcopy") * 1.5 : get("roofline_inplace");
                    const double v1 = get(std::string(op_name(o)) + "/volfuse_ncdhw"),
                                 v2 = get(std::string(op_name(o)) + "/volfuse_ndhwc"),
                                 v3 = get(std::string(op_name(o)) + "/volfuse_nCdhw16c");
                    const double d1 = get(std::string(op_name(o)) + "/onednn_ncdhw"),
                                 d2 = get(std::string(op_name(o)) + "/onednn_ndhwc"),
                                 d3 = get(std::string(op_name(o)) + "/onednn_nCdhw16c");
                    const double tt = get(std::string(op_name(o)) + "/torch_ncdhw");
                    if (v1 == 0) continue;
                    double vbest = v1;
                    for (double v : {v2, v3})
                        if (v > 0) vbest = std::min(vbest, v);
                    double dbest = 0;
                    for (double d : {d1, d2, d3})
                        if (d > 0) dbest = dbest > 0 ? std::min(dbest, d) : d;
                    // A ratio with a row the filter left out prints as "-", not as a number.
                    auto ratio = [](double a, double b, int width) {
                        char buf[32];
                        if (a > 0 && b > 0) std::snprintf(buf, sizeof buf, "%*.2f", width, a / b);
                        else std::snprintf(buf, sizeof buf, "%*s", width, "-");
                        return std::string(buf);
                    };
                    std::printf("%-16s %-3d %-15s %8.3f %8.3f %8.3f %8.3f %8.3f %8.3f %8.3f %8.3f %s %s %s\n",
                                shape_str(s).c_str(), t, op_name(o), roof, v1, v2, v3, d1, d2, d3, tt,
                                ratio(vbest, roof, 8).c_str(), ratio(dbest, vbest, 9).c_str(), ratio(tt, vbest, 9).c_str());
                }
    }

};

} // namespace

/// Every benchmark: wall time (threads), and a warm-up (first calls page in buffers,
/// oneDNN builds its kernels, libtorch's allocations settle).
template <class... A>
void add(const std::string& name, A&&... a)
{
    report::add(name, 0.2, 1, std::forward<A>(a)...);
}

int main(int argc, char** argv)
{
    // --smoke; no --threads: this program measures 1 and 2 threads itself.
    if (report::take_flags(argc, argv).threads != 1) {
        std::fprintf(stderr, "--threads: this benchmark runs 1 and 2 threads itself\n");
        return 1;
    }
    peers::install_torch_cache();
    // libtorch first: once any oneDNN primitive has run in this process, libtorch's training
    // forward on the larger shapes is ~5x slower ([2,64,64,64,64]: 430 ms instead of 80 ms;
    // cause not found, vzeroupper does not help), which would flatter volfuse.
    for (const auto& s : shapes)
        for (int t : {1, 2})
            for (op o : {op::train, op::eval, op::backward})
                add("peers/" + shape_str(s) + "/" + std::to_string(t) + "T/" + op_name(o) + "/torch_ncdhw", run_torch,
                    s, t, o);
    for (const auto& s : shapes)
        for (int t : {1, 2}) {
            const std::string base = "peers/" + shape_str(s) + "/" + std::to_string(t) + "T/";
            add(base + "roofline_inplace", roof_inplace, s, t);
            add(base + "roofline_ntcopy", roof_ntcopy, s, t);
            for (op o : {op::train, op::eval, op::backward}) {
                const std::string name = base + op_name(o) + "/";
                if (s[1] == 64) {
                    add(name + "volfuse_ncdhw", run_volfuse<vf::ncdhw_t, 64>, s, t, o);
                    add(name + "volfuse_ndhwc", run_volfuse<vf::ndhwc_t, 64>, s, t, o);
                    add(name + "volfuse_nCdhw16c", run_volfuse<vf::nCdhw16c_t, 64>, s, t, o);
                } else {
                    add(name + "volfuse_ncdhw", run_volfuse<vf::ncdhw_t, 32>, s, t, o);
                    add(name + "volfuse_ndhwc", run_volfuse<vf::ndhwc_t, 32>, s, t, o);
                    add(name + "volfuse_nCdhw16c", run_volfuse<vf::nCdhw16c_t, 32>, s, t, o);
                }
                using tag = dnnl::memory::format_tag;
                add(name + "onednn_ncdhw", run_onednn, s, t, o, tag::ncdhw);
                add(name + "onednn_ndhwc", run_onednn, s, t, o, tag::ndhwc);
                add(name + "onednn_nCdhw16c", run_onednn, s, t, o, tag::nCdhw16c);
            }
        }
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    table_reporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    benchmark::Shutdown();
}
