// Conv3d and the fused Conv3d -> BatchNorm3d -> ReLU block on the seed's conv layers, volfuse
// against oneDNN 2.6 and libtorch 1.13 in one process, 1 and 2 threads, fp32: time and
// GFLOP/s (2 * output elements * in_channels * taps per forward).
//   volfuse:  Conv3d<spec> (compile-time specialized), NDHWC; ConvBnReLU3d<spec> train and
//             eval (BN folded), NDHWC.
//   oneDNN:   convolution_auto with format `any` (it picks its layouts) and bias; eval =
//             conv with a ReLU post-op (BN folded, as volfuse does); train = conv, then its
//             batch_normalization primitive with fuse_norm_relu, in place.
//   libtorch: at::conv3d; chain = conv3d -> native_batch_norm -> relu_ (NCDHW), outputs
//             recycled by a caching allocator.
// Also per layer: an in-place read+write of the output (what one normalize sweep costs),
// for the targets "inference block <= 1.03x bare conv" and "training block <= bare conv +
// one sweep".
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <benchmark/benchmark.h>
#include <dnnl.hpp>
#include <volfuse/volfuse.hpp>

#include "peers_common.hpp"
#include "report.hpp"
#include "roofline.hpp"

namespace vf = volfuse;
using vf::index_t;

namespace {

using sizes5 = std::array<index_t, 5>;

struct layer {
    const char* name;
    index_t in, out, k, s, p;
    sizes5 x; // N, C, D, H, W
};
const layer layers[] = {
    {"conv1x32_k3", 1, 32, 3, 1, 1, {2, 1, 64, 64, 64}},
    {"conv32x64_k3", 32, 64, 3, 1, 1, {2, 32, 64, 64, 64}},
    {"conv64x128_k3", 64, 128, 3, 1, 1, {8, 64, 8, 56, 56}},
    {"conv3x64_k7s2", 3, 64, 7, 2, 3, {2, 3, 32, 224, 224}},
};
// The same layers as compile-time specs (what gen/ would emit).
constexpr vf::conv_spec spec0{.in = 1, .out = 32, .kernel = 3, .stride = 1, .padding = 1, .dilation = 1};
constexpr vf::conv_spec spec1{.in = 32, .out = 64, .kernel = 3, .stride = 1, .padding = 1, .dilation = 1};
constexpr vf::conv_spec spec2{.in = 64, .out = 128, .kernel = 3, .stride = 1, .padding = 1, .dilation = 1};
constexpr vf::conv_spec spec3{.in = 3, .out = 64, .kernel = 7, .stride = 2, .padding = 3, .dilation = 1};

index_t numel(const sizes5& s) { return s[0] * s[1] * s[2] * s[3] * s[4]; }
sizes5 out_sizes(const layer& l)
{
    auto o = [&](index_t i) { return (i + 2 * l.p - (l.k - 1) - 1) / l.s + 1; };
    return {l.x[0], l.out, o(l.x[2]), o(l.x[3]), o(l.x[4])};
}
double flops(const layer& l) { return 2.0 * static_cast<double>(numel(out_sizes(l))) * l.in * l.k * l.k * l.k; }

void set_rate(benchmark::State& st, const layer& l)
{
    st.counters["GFLOP/s"] = benchmark::Counter(flops(l) * static_cast<double>(st.iterations()) / 1e9,
                                                benchmark::Counter::kIsRate);
}

/// Input and output buffers, page aligned, filled once.
struct buffers {
    std::vector<float, roofline::page_aligned<float>> x, y;
};
buffers& get(const layer& l)
{
    static std::map<const layer*, buffers> all;
    auto& b = all[&l];
    if (b.x.empty()) {
        b.x.resize(static_cast<std::size_t>(numel(l.x)));
        for (std::size_t i = 0; i < b.x.size(); ++i) b.x[i] = static_cast<float>((i * 7919) % 4099) / 2049.f - 1.f;
        b.y.assign(static_cast<std::size_t>(numel(out_sizes(l))), 0.f);
    }
    return b;
}

enum class what { conv, block_train, block_eval };

template <vf::conv_spec S>
void run_volfuse(benchmark::State& st, const layer* l, int t, what w)
{
    peers::set_threads(t);
    auto& b = get(*l);
    const auto X = vf::ndhwc_view(b.x.data(), std::span<const index_t>(l->x));
    const auto os = out_sizes(*l);
    const auto Y = vf::ndhwc_view(b.y.data(), std::span<const index_t>(os));
    vf::Conv3d<S> conv;
    if (w == what::conv) {
        for (auto _ : st) conv.forward(X, Y);
    } else {
        vf::ConvBnReLU3d<S> block(std::move(conv), vf::BatchNorm3d<>(l->out));
        block.train(w == what::block_train);
        for (auto _ : st) block.forward(X, Y);
    }
    set_rate(st, *l);
}

void run_sweep(benchmark::State& st, const layer* l, int t)
{
    peers::set_threads(t);
    auto& b = get(*l);
    for (auto _ : st) {
        roofline::inplace(b.y.data(), numel(out_sizes(*l)), t);
        benchmark::ClobberMemory();
    }
}

void run_onednn(benchmark::State& st, const layer* l, int t, what w)
{
    using namespace dnnl;
    using tag = memory::format_tag;
    peers::set_threads(t);
    engine eng(engine::kind::cpu, 0);
    stream strm(eng);
    const auto os = out_sizes(*l);
    const memory::dims src_d{l->x[0], l->x[1], l->x[2], l->x[3], l->x[4]}, wei_d{l->out, l->in, l->k, l->k, l->k},
        dst_d{os[0], os[1], os[2], os[3], os[4]}, str{l->s, l->s, l->s}, dil{0, 0, 0}, pad{l->p, l->p, l->p};
    const memory::desc src_md(src_d, memory::data_type::f32, tag::any), wei_md(wei_d, memory::data_type::f32, tag::any),
        bia_md({l->out}, memory::data_type::f32, tag::x), dst_md(dst_d, memory::data_type::f32, tag::any);
    const auto kind = w == what::block_train ? prop_kind::forward_training : prop_kind::forward_inference;
    convolution_forward::desc cd(kind, algorithm::convolution_auto, src_md, wei_md, bia_md, dst_md, str, dil, pad, pad);
    primitive_attr attr;
    if (w == what::block_eval) {
        post_ops po;
        po.append_eltwise(1.f, algorithm::eltwise_relu, 0.f, 0.f);
        attr.set_post_ops(po);
    }
    convolution_forward::primitive_desc pd(cd, attr, eng);
    memory src(pd.src_desc(), eng), wei(pd.weights_desc(), eng), bia(pd.bias_desc(), eng), dst(pd.dst_desc(), eng);
    for (auto* m : {&src, &wei, &bia}) {
        auto* p = static_cast<float*>(m->get_data_handle());
        const std::size_t n = m->get_desc().get_size() / sizeof(float);
        for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<float>((i * 7919) % 4099) / 20490.f - 0.1f;
    }
    convolution_forward conv(pd);
    const std::unordered_map<int, memory> conv_args{
        {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_BIAS, bia}, {DNNL_ARG_DST, dst}};
    if (w == what::block_train) {
        batch_normalization_forward::primitive_desc bpd(
            {prop_kind::forward_training, pd.dst_desc(), 1e-5f,
             normalization_flags::use_scale_shift | normalization_flags::fuse_norm_relu},
            eng);
        memory mean(bpd.mean_desc(), eng), var(bpd.variance_desc(), eng), ss(bpd.weights_desc(), eng),
            ws(bpd.workspace_desc(), eng);
        std::fill_n(static_cast<float*>(ss.get_data_handle()), 2 * l->out, 1.f);
        batch_normalization_forward bn(bpd);
        for (auto _ : st) {
            conv.execute(strm, conv_args);
            bn.execute(strm, {{DNNL_ARG_SRC, dst}, {DNNL_ARG_DST, dst}, {DNNL_ARG_MEAN, mean}, {DNNL_ARG_VARIANCE, var},
                              {DNNL_ARG_SCALE_SHIFT, ss}, {DNNL_ARG_WORKSPACE, ws}});
            strm.wait();
        }
    } else {
        for (auto _ : st) {
            conv.execute(strm, conv_args);
            strm.wait();
        }
    }
    set_rate(st, *l);
}

void run_torch(benchmark::State& st, const layer* l, int t, what w)
{
    peers::set_threads(t);
    {
        auto x = at::randn({l->x[0], l->x[1], l->x[2], l->x[3], l->x[4]});
        auto wt = at::randn({l->out, l->in, l->k, l->k, l->k}) * 0.05, bias = at::zeros({l->out});
        auto g = at::ones({l->out}), beta = at::zeros({l->out}), rm = at::zeros({l->out}), rv = at::ones({l->out});
        const std::vector<int64_t> str(3, l->s), pad(3, l->p), dil(3, 1);
        for (auto _ : st) {
            auto y = at::conv3d(x, wt, bias, str, pad, dil);
            if (w != what::conv)
                y = std::get<0>(at::native_batch_norm(y, g, beta, rm, rv, w == what::block_train, 0.1, 1e-5)).relu_();
            benchmark::DoNotOptimize(y.data_ptr());
        }
    }
    peers::caching_allocator::trim();
    set_rate(st, *l);
}

const char* what_name(what w) { return w == what::conv ? "conv" : w == what::block_train ? "train" : "eval"; }

/// Prints per layer/threads: times (ms) and GFLOP/s, and the ratios the targets use.
class table_reporter : public report::collecting {
public:
    void Finalize() override
    {
        ConsoleReporter::Finalize();
        std::printf("\nConv3d and Conv3d -> BatchNorm3d -> ReLU, fp32, times in ms (GFLOP/s of the conv in brackets).\n"
                    "vf = volfuse NDHWC (specialized); dnnl = oneDNN (its layouts; eval: conv + ReLU post-op, BN\n"
                    "folded; train: conv then BN+ReLU primitive); torch = libtorch NCDHW conv3d -> batch_norm -> relu_.\n"
                    "sweep = in-place read+write of the output.\n\n");
        std::printf("%-14s %-3s %-6s %16s %16s %16s %8s %9s %9s\n", "layer", "thr", "op", "volfuse", "oneDNN", "libtorch",
                    "sweep", "dnnl/vf", "torch/vf");
        for (const auto& l : layers)
            for (int t : {1, 2}) {
                const std::string base = std::string("conv/") + l.name + "/" + std::to_string(t) + "T/";
                auto get = [&](const std::string& k) {
                    const auto it = ms_.find(base + k);
                    return it == ms_.end() ? 0.0 : it->second;
                };
                const double sweep = get("sweep");
                for (what w : {what::conv, what::block_eval, what::block_train}) {
                    const std::string op = what_name(w);
                    const double v = get(op + "/volfuse"), d = get(op + "/onednn"), tt = get(op + "/torch");
                    auto cell = [&](double ms) {
                        char buf[32];
                        std::snprintf(buf, sizeof buf, "%8.1f (%4.0f)", ms, ms > 0 ? flops(l) / ms / 1e6 : 0.0);
                        return std::string(buf);
                    };
                    std::printf("%-14s %-3d %-6s %16s %16s %16s %8.1f %9.2f %9.2f\n", l.name, t, op.c_str(),
                                cell(v).c_str(), cell(d).c_str(), cell(tt).c_str(), sweep, v > 0 ? d / v : 0.0,
                                v > 0 ? tt / v : 0.0);
                }
                const double c = get("conv/volfuse"), e = get("eval/volfuse"), tr = get("train/volfuse");
                if (c > 0)
                    std::printf("%-14s %-3d block eval / conv %.3f (target <= 1.03); block train / (conv + sweep) %.3f "
                                "(target <= 1)\n",
                                l.name, t, e / c, tr / (c + sweep));
            }
    }

};

template <class... A>
void add(const std::string& name, A&&... a)
{
    report::add(name, 0.2, std::forward<A>(a)...);
}

} // namespace

int main(int argc, char** argv)
{
    // --smoke; no --threads: this program measures 1 and 2 threads itself.
    if (report::take_flags(argc, argv).threads != 1) {
        std::fprintf(stderr, "--threads: this benchmark runs 1 and 2 threads itself\n");
        return 1;
    }
    peers::install_torch_cache();
    using fn = void (*)(benchmark::State&, const layer*, int, what);
    const fn specialized[] = {run_volfuse<spec0>, run_volfuse<spec1>, run_volfuse<spec2>, run_volfuse<spec3>};
    // libtorch first (see bench_peers.cpp: oneDNN primitives slow it down in this process).
    for (int i = 0; i < 4; ++i)
        for (int t : {1, 2})
            for (what w : {what::conv, what::block_eval, what::block_train})
                add(std::string("conv/") + layers[i].name + "/" + std::to_string(t) + "T/" + what_name(w) + "/torch",
                    run_torch, &layers[i], t, w);
    for (int i = 0; i < 4; ++i)
        for (int t : {1, 2}) {
            const std::string base = std::string("conv/") + layers[i].name + "/" + std::to_string(t) + "T/";
            add(base + "sweep", run_sweep, &layers[i], t);
            for (what w : {what::conv, what::block_eval, what::block_train}) {
                add(base + what_name(w) + "/volfuse", specialized[i], &layers[i], t, w);
                add(base + what_name(w) + "/onednn", run_onednn, &layers[i], t, w);
            }
        }
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    table_reporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    benchmark::Shutdown();
}
