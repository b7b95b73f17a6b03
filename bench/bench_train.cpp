// Conv3d forward, grad input and grad weight, the fused Conv3d -> BatchNorm3d -> ReLU block's
// training step (forward + backward) and its inference forward, on the seed networks' four
// conv layers: volfuse against oneDNN 2.6 and libtorch 1.13 in one process, 1 and 2 threads,
// fp32, with the core's FMA peak measured in the same run.
//   volfuse:  NDHWC; Conv3d<spec> / ConvBnReLU3d<spec> (compile-time specialized, `vf`) and
//             the runtime-shaped Conv3d<> / ConvBnReLU3d<> (`vf_dyn`, no generated kernels
//             registered: the fallback instantiation of the same templates).
//   oneDNN:   convolution_auto, format `any` (it picks its layouts), bias; grad input /
//             grad weight (+ bias) from its backward primitives; training step = conv, BN +
//             ReLU (fuse_norm_relu, in place), BN backward, conv backward data and weights;
//             inference block = conv with a ReLU post-op (BN folded, as volfuse does).
//   libtorch: NCDHW; at::conv3d and at::convolution_backward; training step = the ops its
//             autograd runs for conv3d -> batch_norm -> relu (forward, then threshold_backward,
//             native_batch_norm_backward, convolution_backward), called directly.
// GFLOP/s count 2 * output elements * in_channels * taps per convolution (a training step
// runs three: forward, grad input, grad weight); `peak` is fused multiply-adds on independent
// registers, the same threads.
#include <cstdio>
#include <map>
#include <optional>
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

enum class op { fwd, bwd_data, bwd_weight, train_step, eval_block };
constexpr op all_ops[] = {op::fwd, op::bwd_data, op::bwd_weight, op::train_step, op::eval_block};
const char* op_name(op o)
{
    switch (o) {
    case op::fwd: return "fwd";
    case op::bwd_data: return "bwd_data";
    case op::bwd_weight: return "bwd_weight";
    case op::train_step: return "train_step";
    case op::eval_block: return "eval_block";
    }
    return "?";
}

index_t numel(const sizes5& s) { return s[0] * s[1] * s[2] * s[3] * s[4]; }
sizes5 out_sizes(const layer& l)
{
    auto o = [&](index_t i) { return (i + 2 * l.p - (l.k - 1) - 1) / l.s + 1; };
    return {l.x[0], l.out, o(l.x[2]), o(l.x[3]), o(l.x[4])};
}
/// FLOPs of one convolution of the layer; a training step runs three.
double conv_flops(const layer& l) { return 2.0 * static_cast<double>(numel(out_sizes(l))) * l.in * l.k * l.k * l.k; }
double flops(const layer& l, op o) { return (o == op::train_step ? 3 : 1) * conv_flops(l); }

void set_rate(benchmark::State& st, double f)
{
    st.counters["GFLOP/s"] =
        benchmark::Counter(f * static_cast<double>(st.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

/// Input, output and their gradients, page aligned, filled once per layer.
struct buffers {
    std::vector<float, roofline::page_aligned<float>> x, y, dy, dx;
};
buffers& get(const layer& l)
{
    static std::map<const layer*, buffers> all;
    auto& b = all[&l];
    if (b.x.empty()) {
        auto fill = [](auto& v, std::size_t n, unsigned salt) {
            v.resize(n);
            for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>((i * 7919 + salt) % 4099) / 2049.f - 1.f;
        };
        fill(b.x, static_cast<std::size_t>(numel(l.x)), 0);
        fill(b.dy, static_cast<std::size_t>(numel(out_sizes(l))), 17);
        b.y.assign(b.dy.size(), 0.f);
        b.dx.assign(b.x.size(), 0.f);
    }
    return b;
}

// --- volfuse ----------------------------------------------------------------------------

template <vf::conv_spec S>
void run_volfuse(benchmark::State& st, const layer* l, int t, op o)
{
    peers::set_threads(t);
    auto& b = get(*l);
    const auto os = out_sizes(*l);
    const auto X = vf::ndhwc_view(b.x.data(), std::span<const index_t>(l->x));
    const auto Y = vf::ndhwc_view(b.y.data(), std::span<const index_t>(os));
    const auto dY = vf::ndhwc_view(b.dy.data(), std::span<const index_t>(os));
    const auto dX = vf::ndhwc_view(b.dx.data(), std::span<const index_t>(l->x));
    vf::Conv3d<S> conv(l->in, l->out, l->k, l->s, l->p);
    switch (o) {
    case op::fwd:
        for (auto _ : st) conv.forward(X, Y);
        break;
    case op::bwd_data:
        for (auto _ : st) conv.backward_input(dY, dX);
        break;
    case op::bwd_weight:
        for (auto _ : st) conv.backward_weight(X, dY);
        break;
    case op::train_step:
    case op::eval_block: {
        vf::ConvBnReLU3d<S> block(std::move(conv), vf::BatchNorm3d<>(l->out));
        block.train(o == op::train_step);
        for (auto _ : st) {
            block.forward(X, Y);
            if (o == op::train_step) block.backward(X, dY, dX);
        }
    } break;
    }
    set_rate(st, flops(*l, o));
}

/// `iters` rounds of one fma on each of K independent registers (K chains cover the FMA
/// latency on every port of the targets), in assembly: compilers reorder or spill such a loop
/// written in C++ (GCC 12 swaps the loops and runs one latency-bound chain at a time).
/// Returns K.
inline int fma_chains(index_t iters)
{
#if defined(__AVX512F__)
    asm volatile("vxorps %%zmm30, %%zmm30, %%zmm30\n vxorps %%zmm31, %%zmm31, %%zmm31\n"
                 "1:\n"
                 "vfmadd231ps %%zmm30, %%zmm31, %%zmm0\n vfmadd231ps %%zmm30, %%zmm31, %%zmm1\n"
                 "vfmadd231ps %%zmm30, %%zmm31, %%zmm2\n vfmadd231ps %%zmm30, %%zmm31, %%zmm3\n"
                 "vfmadd231ps %%zmm30, %%zmm31, %%zmm4\n vfmadd231ps %%zmm30, %%zmm31, %%zmm5\n"
                 "vfmadd231ps %%zmm30, %%zmm31, %%zmm6\n vfmadd231ps %%zmm30, %%zmm31, %%zmm7\n"
                 "vfmadd231ps %%zmm30, %%zmm31, %%zmm8\n vfmadd231ps %%zmm30, %%zmm31, %%zmm9\n"
                 "vfmadd231ps %%zmm30, %%zmm31, %%zmm10\n vfmadd231ps %%zmm30, %%zmm31, %%zmm11\n"
                 "vfmadd231ps %%zmm30, %%zmm31, %%zmm12\n vfmadd231ps %%zmm30, %%zmm31, %%zmm13\n"
                 "vfmadd231ps %%zmm30, %%zmm31, %%zmm14\n vfmadd231ps %%zmm30, %%zmm31, %%zmm15\n"
                 "vfmadd231ps %%zmm30, %%zmm31, %%zmm16\n vfmadd231ps %%zmm30, %%zmm31, %%zmm17\n"
                 "vfmadd231ps %%zmm30, %%zmm31, %%zmm18\n vfmadd231ps %%zmm30, %%zmm31, %%zmm19\n"
                 "vfmadd231ps %%zmm30, %%zmm31, %%zmm20\n vfmadd231ps %%zmm30, %%zmm31, %%zmm21\n"
                 "vfmadd231ps %%zmm30, %%zmm31, %%zmm22\n vfmadd231ps %%zmm30, %%zmm31, %%zmm23\n"
                 "dec %0\n jnz 1b\n"
                 : "+r"(iters)
                 :
                 : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
                   "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20",
                   "xmm21", "xmm22", "xmm23", "xmm30", "xmm31", "cc");
    return 24;
#elif defined(__AVX2__) && defined(__FMA__)
    asm volatile("vxorps %%ymm14, %%ymm14, %%ymm14\n vxorps %%ymm15, %%ymm15, %%ymm15\n"
                 "1:\n"
                 "vfmadd231ps %%ymm14, %%ymm15, %%ymm0\n vfmadd231ps %%ymm14, %%ymm15, %%ymm1\n"
                 "vfmadd231ps %%ymm14, %%ymm15, %%ymm2\n vfmadd231ps %%ymm14, %%ymm15, %%ymm3\n"
                 "vfmadd231ps %%ymm14, %%ymm15, %%ymm4\n vfmadd231ps %%ymm14, %%ymm15, %%ymm5\n"
                 "vfmadd231ps %%ymm14, %%ymm15, %%ymm6\n vfmadd231ps %%ymm14, %%ymm15, %%ymm7\n"
                 "vfmadd231ps %%ymm14, %%ymm15, %%ymm8\n vfmadd231ps %%ymm14, %%ymm15, %%ymm9\n"
                 "vfmadd231ps %%ymm14, %%ymm15, %%ymm10\n vfmadd231ps %%ymm14, %%ymm15, %%ymm11\n"
                 "dec %0\n jnz 1b\n"
                 : "+r"(iters)
                 :
                 : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
                   "xmm11", "xmm14", "xmm15", "cc");
    return 12;
#else
#error "bench_train's FMA peak needs AVX2+FMA or AVX-512 (build the benchmarks with -march=native)"
#endif
}

/// The core's fused multiply-add throughput, measured with the same threads as the kernels.
void run_peak(benchmark::State& st, int t)
{
    constexpr index_t iters = 1 << 20;
    int chains = 0;
    for (auto _ : st) {
#pragma omp parallel num_threads(t)
        {
            const int k = fma_chains(iters);
#pragma omp master
            chains = k;
        }
    }
    set_rate(st, 2.0 * vf::simd::width * chains * static_cast<double>(iters) * t);
}

// --- oneDNN -----------------------------------------------------------------------------

void fill_memory(const dnnl::memory& m, float scale)
{
    auto* p = static_cast<float*>(m.get_data_handle());
    const std::size_t n = m.get_desc().get_size() / sizeof(float);
    for (std::size_t i = 0; i < n; ++i) p[i] = (static_cast<float>((i * 7919) % 4099) / 2049.f - 1.f) * scale;
}

void run_onednn(benchmark::State& st, const layer* l, int t, op o)
{
    using namespace dnnl;
    using tag = memory::format_tag;
    using dt = memory::data_type;
    peers::set_threads(t);
    engine eng(engine::kind::cpu, 0);
    stream strm(eng);
    const auto os = out_sizes(*l);
    const memory::dims src_d{l->x[0], l->x[1], l->x[2], l->x[3], l->x[4]}, wei_d{l->out, l->in, l->k, l->k, l->k},
        dst_d{os[0], os[1], os[2], os[3], os[4]}, str{l->s, l->s, l->s}, dil{0, 0, 0}, pad{l->p, l->p, l->p};
    const memory::desc src_md(src_d, dt::f32, tag::any), wei_md(wei_d, dt::f32, tag::any),
        bia_md({l->out}, dt::f32, tag::x), dst_md(dst_d, dt::f32, tag::any);
    const bool training = o != op::fwd && o != op::eval_block;
    convolution_forward::desc cd(training ? prop_kind::forward_training : prop_kind::forward_inference,
                                 algorithm::convolution_auto, src_md, wei_md, bia_md, dst_md, str, dil, pad, pad);
    primitive_attr attr;
    if (o == op::eval_block) {
        post_ops po;
        po.append_eltwise(1.f, algorithm::eltwise_relu, 0.f, 0.f);
        attr.set_post_ops(po);
    }
    convolution_forward::primitive_desc fpd(cd, attr, eng);
    memory src(fpd.src_desc(), eng), wei(fpd.weights_desc(), eng), bia(fpd.bias_desc(), eng), dst(fpd.dst_desc(), eng);
    fill_memory(src, 1.f);
    fill_memory(wei, 0.05f);
    fill_memory(bia, 0.1f);
    convolution_forward conv(fpd);
    // Backward primitives, hinted by the forward (their layouts follow its choice).
    convolution_backward_data::primitive_desc dpd(
        {algorithm::convolution_auto, src_md, wei_md, dst_md, str, dil, pad, pad}, eng, fpd);
    convolution_backward_weights::primitive_desc wpd(
        {algorithm::convolution_auto, src_md, wei_md, bia_md, dst_md, str, dil, pad, pad}, eng, fpd);
    memory diff_dst(dpd.diff_dst_desc(), eng), diff_src(dpd.diff_src_desc(), eng);
    memory diff_wei(wpd.diff_weights_desc(), eng), diff_bia(wpd.diff_bias_desc(), eng);
    fill_memory(diff_dst, 1.f);
    // Layout conversions oneDNN would run between them in a network are its own business: a
    // primitive whose preferred layouts differ gets reordered copies made once, outside the loop.
    auto as = [&](memory m, const memory::desc& d) {
        if (m.get_desc() == d) return m;
        memory r(d, eng);
        reorder(m, r).execute(strm, m, r);
        strm.wait();
        return r;
    };
    const memory wsrc = as(src, wpd.src_desc()), wdst = as(diff_dst, wpd.diff_dst_desc()),
                 dwei = as(wei, dpd.weights_desc());
    convolution_backward_data bwd_data(dpd);
    convolution_backward_weights bwd_weights(wpd);
    const std::unordered_map<int, memory> fwd_args{
        {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_BIAS, bia}, {DNNL_ARG_DST, dst}};
    const std::unordered_map<int, memory> data_args{
        {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, dwei}, {DNNL_ARG_DIFF_SRC, diff_src}};
    const std::unordered_map<int, memory> weight_args{
        {DNNL_ARG_SRC, wsrc}, {DNNL_ARG_DIFF_DST, wdst}, {DNNL_ARG_DIFF_WEIGHTS, diff_wei}, {DNNL_ARG_DIFF_BIAS, diff_bia}};
    switch (o) {
    case op::fwd:
    case op::eval_block:
        for (auto _ : st) {
            conv.execute(strm, fwd_args);
            strm.wait();
        }
        break;
    case op::bwd_data:
        for (auto _ : st) {
            bwd_data.execute(strm, data_args);
            strm.wait();
        }
        break;
    case op::bwd_weight:
        for (auto _ : st) {
            bwd_weights.execute(strm, weight_args);
            strm.wait();
        }
        break;
    case op::train_step: {
        // BN on the conv output's layout, the incoming gradient given in it (the next layer's
        // business, as the diff_dst fill above).  Where the backward convolutions chose other
        // layouts (oneDNN's AVX2 kernels do, for some shapes), the step reorders into them on
        // every iteration, as a oneDNN network must: those copies are part of its step.
        const auto flags = normalization_flags::use_scale_shift | normalization_flags::fuse_norm_relu;
        const memory::desc zd = fpd.dst_desc();
        batch_normalization_forward::primitive_desc bpd({prop_kind::forward_training, zd, 1e-5f, flags}, eng);
        batch_normalization_backward::primitive_desc bbpd({prop_kind::backward, zd, zd, 1e-5f, flags}, eng, bpd);
        memory mean(bpd.mean_desc(), eng), var(bpd.variance_desc(), eng), ss(bpd.weights_desc(), eng),
            ws(bpd.workspace_desc(), eng), dss(bbpd.diff_weights_desc(), eng), dz(bbpd.diff_src_desc(), eng);
        std::fill_n(static_cast<float*>(ss.get_data_handle()), 2 * l->out, 1.f);
        memory z(zd, eng), y(zd, eng); // conv output kept for BN backward
        const memory dy = as(diff_dst, zd);
        // A copy of `from` in layout d, refreshed by run() each step (none when the layouts agree).
        struct converted {
            memory from, to;
            std::optional<dnnl::reorder> r;
            void run(stream& s) { if (r) r->execute(s, from, to); }
        };
        auto convert = [&](memory from, const memory::desc& d) {
            if (from.get_desc() == d) return converted{from, from, std::nullopt};
            memory to(d, eng);
            return converted{from, to, dnnl::reorder(from, to)};
        };
        converted dz_data = convert(dz, dpd.diff_dst_desc()), dz_weights = convert(dz, wpd.diff_dst_desc()),
                  src_weights = convert(src, wpd.src_desc()), wei_data = convert(wei, dpd.weights_desc());
        batch_normalization_forward bn(bpd);
        batch_normalization_backward bn_bwd(bbpd);
        for (auto _ : st) {
            conv.execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_BIAS, bia}, {DNNL_ARG_DST, z}});
            bn.execute(strm, {{DNNL_ARG_SRC, z}, {DNNL_ARG_DST, y}, {DNNL_ARG_MEAN, mean}, {DNNL_ARG_VARIANCE, var},
                              {DNNL_ARG_SCALE_SHIFT, ss}, {DNNL_ARG_WORKSPACE, ws}});
            bn_bwd.execute(strm, {{DNNL_ARG_SRC, z}, {DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_MEAN, mean},
                                  {DNNL_ARG_VARIANCE, var}, {DNNL_ARG_SCALE_SHIFT, ss}, {DNNL_ARG_WORKSPACE, ws},
                                  {DNNL_ARG_DIFF_SRC, dz}, {DNNL_ARG_DIFF_SCALE_SHIFT, dss}});
            dz_data.run(strm);
            wei_data.run(strm);
            bwd_data.execute(strm, {{DNNL_ARG_DIFF_DST, dz_data.to}, {DNNL_ARG_WEIGHTS, wei_data.to},
                                    {DNNL_ARG_DIFF_SRC, diff_src}});
            dz_weights.run(strm);
            src_weights.run(strm);
            bwd_weights.execute(strm, {{DNNL_ARG_SRC, src_weights.to}, {DNNL_ARG_DIFF_DST, dz_weights.to},
                                       {DNNL_ARG_DIFF_WEIGHTS, diff_wei}, {DNNL_ARG_DIFF_BIAS, diff_bia}});
            strm.wait();
        }
    } break;
    }
    set_rate(st, flops(*l, o));
}

// --- libtorch ---------------------------------------------------------------------------

void run_torch(benchmark::State& st, const layer* l, int t, op o)
{
    peers::set_threads(t);
    {
        auto x = at::randn({l->x[0], l->x[1], l->x[2], l->x[3], l->x[4]});
        auto wt = at::randn({l->out, l->in, l->k, l->k, l->k}) * 0.05, bias = at::zeros({l->out});
        auto g = at::ones({l->out}), beta = at::zeros({l->out}), rm = at::zeros({l->out}), rv = at::ones({l->out});
        const auto os = out_sizes(*l);
        auto dy = at::randn({os[0], os[1], os[2], os[3], os[4]});
        const std::vector<int64_t> str(3, l->s), pad(3, l->p), dil(3, 1), outpad(3, 0), bias_sizes{l->out};
        auto conv_backward = [&](const at::Tensor& d, std::array<bool, 3> mask) {
            return at::convolution_backward(d, x, wt, bias_sizes, str, pad, dil, false, outpad, 1, mask);
        };
        for (auto _ : st) {
            switch (o) {
            case op::fwd: benchmark::DoNotOptimize(at::conv3d(x, wt, bias, str, pad, dil).data_ptr()); break;
            case op::bwd_data: benchmark::DoNotOptimize(std::get<0>(conv_backward(dy, {true, false, false})).data_ptr()); break;
            case op::bwd_weight: benchmark::DoNotOptimize(std::get<1>(conv_backward(dy, {false, true, true})).data_ptr()); break;
            case op::eval_block: {
                auto z = at::conv3d(x, wt, bias, str, pad, dil);
                benchmark::DoNotOptimize(std::get<0>(at::native_batch_norm(z, g, beta, rm, rv, false, 0.1, 1e-5)).relu_().data_ptr());
            } break;
            case op::train_step: {
                auto z = at::conv3d(x, wt, bias, str, pad, dil);
                auto [bn, save_mean, save_invstd] = at::native_batch_norm(z, g, beta, rm, rv, true, 0.1, 1e-5);
                auto y = bn.relu_();
                auto dbn = at::threshold_backward(dy, y, 0);
                auto [dz, dgamma, dbeta] = at::native_batch_norm_backward(dbn, z, g, rm, rv, save_mean, save_invstd, true,
                                                                         1e-5, {true, true, true});
                auto grads = conv_backward(dz, {true, true, true});
                benchmark::DoNotOptimize(std::get<0>(grads).data_ptr());
                benchmark::DoNotOptimize(dgamma.data_ptr());
            } break;
            }
        }
    }
    peers::caching_allocator::trim();
    set_rate(st, flops(*l, o));
}

/// Per layer and thread count: each op's time (ms), GFLOP/s and percent of the measured peak
/// for volfuse (specialized and runtime-shaped), oneDNN and libtorch, and the ratios the
/// targets use (peer time / volfuse time; runtime-shaped time / specialized time).
class table_reporter : public report::collecting {
public:
    void Finalize() override
    {
        ConsoleReporter::Finalize();
        std::printf("\nConv3d and the fused Conv3d -> BatchNorm3d -> ReLU block, fp32: ms (GFLOP/s, %% of the FMA peak\n"
                    "measured in this run with the same threads).  vf = volfuse NDHWC, specialized conv_spec;\n"
                    "vf_dyn = runtime-shaped; dnnl = oneDNN (its layouts); torch = libtorch NCDHW.\n"
                    "train_step = block forward + backward (3 convolutions counted).  Each row: the fastest\n"
                    "of 3 repetitions (rows of one layer and op run side by side).\n\n");
        for (int t : {1, 2}) {
            const auto pk = ms_.find("peak/" + std::to_string(t) + "T");
            if (pk == ms_.end()) continue;
            peak_[t] = gflops_.at(pk->first);
            std::printf("peak, %d thread(s): %.1f GFLOP/s\n", t, peak_[t]);
        }
        std::printf("\n%-14s %-3s %-10s %21s %21s %21s %21s %8s %8s %8s\n", "layer", "thr", "op", "vf", "vf_dyn", "dnnl",
                    "torch", "dnnl/vf", "torch/vf", "dyn/vf");
        for (const auto& l : layers)
            for (int t : {1, 2})
                for (op o : all_ops) {
                    const std::string base =
                        std::string("train/") + l.name + "/" + std::to_string(t) + "T/" + op_name(o) + "/";
                    const double v = get(base + "volfuse"), vd = get(base + "volfuse_dyn"), d = get(base + "onednn"),
                                 tt = get(base + "torch");
                    auto ratio = [&](double a, double b) { return a > 0 && b > 0 ? a / b : 0.0; };
                    std::printf("%-14s %-3d %-10s %21s %21s %21s %21s %8.2f %8.2f %8.2f\n", l.name, t, op_name(o),
                                cell(v, l, o, t).c_str(), cell(vd, l, o, t).c_str(), cell(d, l, o, t).c_str(),
                                cell(tt, l, o, t).c_str(), ratio(d, v), ratio(tt, v), ratio(vd, v));
                }
    }

private:
    double get(const std::string& k) const
    {
        const auto it = ms_.find(k);
        return it == ms_.end() ? 0.0 : it->second;
    }
    std::string cell(double ms, const layer& l, op o, int t) const
    {
        char buf[48];
        if (ms <= 0) return "-";
        const double gf = flops(l, o) / ms / 1e6;
        const auto pk = peak_.find(t);
        if (pk == peak_.end()) std::snprintf(buf, sizeof buf, "%9.1f (%5.0f)", ms, gf);
        else std::snprintf(buf, sizeof buf, "%9.1f (%5.0f,%3.0f%%)", ms, gf, 100 * gf / pk->second);
        return buf;
    }
    void ReportRuns(const std::vector<Run>& runs) override
    {
        collecting::ReportRuns(runs);
        for (const auto& r : runs)
            if (r.run_type == Run::RT_Iteration && !r.error_occurred && r.counters.count("GFLOP/s"))
            { // already a rate; the fastest repetition, as the times
                const auto [it, first] = gflops_.try_emplace(report::name_of(r), r.counters.at("GFLOP/s").value);
                if (!first) it->second = std::max(it->second, r.counters.at("GFLOP/s").value);
            }
    }
    std::map<std::string, double> gflops_;
    std::map<int, double> peak_;
};

template <class... A>
void add(const std::string& name, A&&... a)
{
    report::add(name, 0.2, 3, std::forward<A>(a)...);
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
    using fn = void (*)(benchmark::State&, const layer*, int, op);
    const fn specialized[] = {run_volfuse<spec0>, run_volfuse<spec1>, run_volfuse<spec2>, run_volfuse<spec3>};
    for (int t : {1, 2}) add("peak/" + std::to_string(t) + "T", run_peak, t);
    auto name = [](const layer& l, int t, op o, const char* who) {
        return std::string("train/") + l.name + "/" + std::to_string(t) + "T/" + op_name(o) + "/" + who;
    };
    // libtorch first (see bench_peers.cpp: oneDNN primitives slow it down in this process).
    for (const auto& l : layers)
        for (int t : {1, 2})
            for (op o : all_ops) add(name(l, t, o, "torch"), run_torch, &l, t, o);
    for (int i = 0; i < 4; ++i)
        for (int t : {1, 2})
            for (op o : all_ops) {
                add(name(layers[i], t, o, "volfuse"), specialized[i], &layers[i], t, o);
                add(name(layers[i], t, o, "volfuse_dyn"), run_volfuse<vf::conv_spec{}>, &layers[i], t, o);
                add(name(layers[i], t, o, "onednn"), run_onednn, &layers[i], t, o);
            }
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    table_reporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    benchmark::Shutdown();
}
