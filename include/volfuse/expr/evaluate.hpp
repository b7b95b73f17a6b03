// The evaluator: turns an expression plus an output view into kernel calls.  Each
// supported expression shape lowers to one fused pass (or, for batch norm in
// training, the statistics passes plus one normalize pass); anything else is a
// compile-time error naming what is supported.  Modules are thin layers over it:
// BatchNorm3d::forward builds epi(bn(X)) and calls evaluate, and a bn node asks its
// module only to validate the call and commit its state (prepare_forward).
//   vf::evaluate(Y, vf::relu(bn(X)))        == bn.forward(X, Y, vf::relu)
//   vf::evaluate(Y, bn(X))                  == bn.forward(X, Y)
//   vf::evaluate(Y, vf::relu(vf::channel_affine(X, scale, shift)))
//   vf::evaluate(Y, vf::relu(X))
#pragma once

#include "../core/config.hpp"

#include <string>

#include "../core/checks.hpp"
#include "../core/error.hpp"
#include "../kernels/batch_norm.hpp"
#include "../kernels/channel_loops.hpp"
#include "../kernels/conv3d.hpp"
#include "../registry/registry.hpp"
#include "../schedule/schedule.hpp"
#include "nodes.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

namespace detail {
template <class T>
inline constexpr bool is_bn_v = false;
template <class M, class I>
inline constexpr bool is_bn_v<expr::batch_norm<M, I>> = true;
template <class T>
inline constexpr bool is_affine_v = false;
template <class I>
inline constexpr bool is_affine_v<expr::channel_affine<I>> = true;
template <class T>
inline constexpr bool is_conv_v = false;
template <class M, class I>
inline constexpr bool is_conv_v<expr::conv_output<M, I>> = true;
/// bn(conv(X)): the fused block's expression.
template <class T>
inline constexpr bool is_bn_of_conv_v = false;
template <class M, class CM, class I>
inline constexpr bool is_bn_of_conv_v<expr::batch_norm<M, expr::conv_output<CM, I>>> = true;
template <class T>
inline constexpr bool is_leaf_v = false;
template <class V>
inline constexpr bool is_leaf_v<expr::tensor<V>> = true;

/// Splits an expression into its epilogue and the node under it.
template <class E>
struct split {
    using epilogue = expr::identity_t;
    static const E& inner(const E& e) { return e; }
    static epilogue op(const E&) { return {}; }
};
template <class Op, class In>
struct split<expr::pointwise<Op, In>> {
    using epilogue = Op;
    static const In& inner(const expr::pointwise<Op, In>& e) { return e.in; }
    static Op op(const expr::pointwise<Op, In>& e) { return e.op; }
};

template <class VX, class VY>
void check_pointwise_io(const VX& X, const VY& Y)
{
    static_assert(std::is_same_v<typename VX::layout_type, typename VY::layout_type>,
                  "vf::evaluate: input and output must have the same layout");
    static_assert(!std::is_const_v<typename VY::value_type>, "vf::evaluate: Y must be writable");
    const auto x = operand_of(X, "input"), y = operand_of(Y, "output");
    if (x.sizes != y.sizes)
        throw error("output has shape " + sizes_str(y.sizes) + " but input has shape " + sizes_str(x.sizes));
    check_disjoint(y, x, /*in place*/ true);
}
/// The conv kernels take their epilogue as a flag (identity or relu, through the registry's pointers).
template <class Epi>
inline constexpr bool is_relu = std::is_same_v<Epi, expr::relu_t>;
template <class Epi>
inline constexpr bool conv_epilogue = std::is_same_v<Epi, expr::relu_t> || std::is_same_v<Epi, expr::identity_t>;

template <class VY, class I>
constexpr void check_conv_io()
{
    static_assert(is_leaf_v<I>, "vf::evaluate: a convolution applies to a tensor");
    static_assert(std::is_same_v<typename I::view_type::layout_type, typename VY::layout_type>,
                  "vf::evaluate: input and output must have the same layout");
    static_assert(!std::is_const_v<typename VY::value_type>, "vf::evaluate: Y must be writable");
}

/// The one place that composes the modules' internal phases (validate and commit, run the
/// kernels, finish): Conv3d and BatchNorm3d keep those private and befriend it (and the fused
/// block); users reach them through vf::evaluate and the modules' forward/backward.
struct composer {
    /// epi(conv(X)) into Y: one direct-conv pass with the epilogue applied to each tile.
    template <class VY, class M, class I, class Epi>
    static void conv(const VY& Y, const expr::conv_output<M, I>& node, Epi)
    {
        check_conv_io<VY, I>();
        static_assert(conv_epilogue<Epi>, "vf::evaluate: a conv's epilogue is vf::identity or vf::relu");
        M& conv = *node.module;
        const auto& X = node.in.view;
        const auto* x = conv.prepare_forward(X, operand_of(Y, "output"));
        if (Y.shape().numel() == 0) return;
        auto* y = conv.output_for(Y);
        conv.template run_forward<typename VY::layout_type>(X.sizes(), x, y, is_relu<Epi>);
        conv.finish_output(y, Y);
    }

    /// epi(bn(conv(X))) into Y, the fused block.  Batch statistics: the conv writes its output
    /// z (kept for backward) while its epilogue accumulates per-channel shifted sums from the
    /// tiles in registers (kernels::conv::block_moments); the module turns them into coefficients and running statistics; one
    /// normalize + epilogue sweep writes Y.  Running statistics: BN folded into the conv's
    /// weights and bias, the epilogue applied in the conv's own tile stores: Y written once.
    template <class VY, class BN, class M, class I, class Epi>
    static void conv_bn(const VY& Y, BN& bn, const expr::conv_output<M, I>& node, Epi op)
    {
        check_conv_io<VY, I>();
        M& conv = *node.module;
        const auto& X = node.in.view;
        const auto osz = Y.sizes();
        using T = typename M::value_type;
        const T* x = conv.prepare_forward(X, operand_of(Y, "output"));
        const index_t C = osz[1], rows = osz[0] * osz[2] * osz[3];
        const bool batch_stats = bn.training() || !bn.track_running_stats();
        if (!batch_stats && (bn.num_features() != C))
            throw error("running_mean should contain " + std::to_string(C) + " elements not " +
                        std::to_string(bn.num_features()));
        T* y = conv.output_for(Y);
        if (batch_stats) {
            index_t n = 1;
            for (index_t v : osz) n *= v;
            T* z = conv.kept_output(n);
            double* moments = conv.moments(rows); // workspaces before the module commits its state
            const auto step = bn.prepare_forward(ndhwc_view(static_cast<const T*>(z), osz), ndhwc_view(y, osz), Epi::name);
            if (!step) return;
            conv.template run_forward<typename VY::layout_type>(X.sizes(), x, z, false, moments);
            // The conv epilogue's moments (merged in block order) -> the BN's finalization.
            const index_t P = kernels::conv::round_up(C, simd::lanes<T>);
            const double count = static_cast<double>(n / std::max<index_t>(C, 1));
            for (index_t c = 0; c < C; ++c) {
                step->moments.mean[c] = moments[P + c];
                step->moments.m2[c] = kernels::var_sum_about_rounded_mean<T>(count, moments[P + c], moments[2 * P + c]);
            }
            step->finalize(0, C);
            using Form = typename std::remove_cvref_t<decltype(*step)>::form_type;
            // The BN kernels gen emitted with this block come with the conv's registry entry: the
            // BN runs them here and in its backward (and kernel_choice() says so).
            bn.adopt_kernels(conv.kernel_choice());
            if constexpr (conv_epilogue<Epi> && BN::static_channels == dynamic && std::is_same_v<T, float> &&
                          std::is_same_v<std::remove_cv_t<Form>, registry::dynamic_form<ndhwc_t>>) {
                if (const auto* k = bn.template registered_kernels<ndhwc_t>(is_relu<Epi>)) {
                    k->normalize(step->form, z, y, step->coeffs, is_relu<Epi>);
                    conv.finish_output(y, Y);
                    return;
                }
            }
            kernels::normalize(step->form, 0, C, z, y, step->coeffs, op);
        } else {
            if (Y.shape().numel() == 0) return;
            conv.fold(bn);
            conv.template run_forward<typename VY::layout_type>(X.sizes(), x, y, is_relu<Epi>);
            bn.adopt_kernels(conv.kernel_choice()); // for a backward (which runs the BN unfolded)
            bn.folded_into(conv.kernel_choice());
        }
        conv.finish_output(y, Y);
    }

    /// epi(sync_bn(conv(X))) into Y, the fused block with a SyncBatchNorm3d part.  Training: the
    /// conv's own checks and workspaces become this process's outcome in the BN's agreement
    /// round (an error anywhere is an error everywhere, before anything is committed), then the
    /// conv runs with its epilogue's moments, which are all-gathered and merged in rank order,
    /// finalized, and normalize + epilogue writes Y.  Eval: the local block (BN folded).
    template <class VY, class SBN, class M, class I, class Epi>
    static void conv_sync_bn(const VY& Y, SBN& sbn, const expr::conv_output<M, I>& node, Epi op)
    {
        if (!sbn.training()) {
            sbn.synced_ = false;
            conv_bn(Y, sbn.bn_, node, op);
            return;
        }
        check_conv_io<VY, I>();
        M& conv = *node.module;
        auto& bn = sbn.bn_;
        const auto& X = node.in.view;
        const auto osz = Y.sizes();
        const index_t C = osz[1], rows = osz[0] * osz[2] * osz[3];
        using T = typename M::value_type;
        const T* x = nullptr;
        T *y = nullptr, *z = nullptr;
        double* moments = nullptr;
        index_t n = 0;
        auto h = sbn.try_local([&] {
            x = conv.prepare_forward(X, operand_of(Y, "output"));
            n = 1;
            for (index_t v : osz) n *= v;
            bn.check_channels(C);
            y = conv.output_for(Y);
            z = conv.kept_output(n);
            moments = conv.moments(rows);
            sbn.prepare_buffers(C);
            bn.reserve(C);
        });
        h.count = SBN::values_per_channel(osz);
        sbn.agree(h, osz);
        // Committed from here on.
        const kernels::moments_out m = bn.moments();
        if (n > 0) {
            conv.template run_forward<typename VY::layout_type>(X.sizes(), x, z, false, moments);
            const index_t P = kernels::conv::round_up(C, simd::lanes<T>);
            for (index_t c = 0; c < C; ++c) m.mean[c] = moments[P + c], m.m2[c] = moments[2 * P + c];
        }
        sbn.exchange(sbn.message_of_moments(C, h.count, n > 0));
        sbn.commit_forward(C, osz, z, y, ndhwc_t::name, Epi::name);
        if (n > 0) {
            const auto f = SBN::bn_type::specialize(ndhwc_view(static_cast<const T*>(z), osz)).form();
            kernels::normalize(f, 0, C, z, y, bn.coeffs(), op);
            conv.finish_output(y, Y);
        }
    }

    /// epi(bn(X)) into Y: the module validates and commits its state; what runs is chosen here.
    template <class VY, class BN, class VX, class Op>
    static void batch_norm(const VY& Y, BN& bn, const VX& X, Op op)
    {
        if (const auto step = bn.prepare_forward(X, Y, Op::name)) {
            using L = typename VY::layout_type;
            using Form = typename std::remove_cvref_t<decltype(*step)>::form_type;
            if constexpr (conv_epilogue<Op> && BN::static_channels == dynamic &&
                          std::is_same_v<typename BN::value_type, float> &&
                          std::is_same_v<std::remove_cv_t<Form>, registry::dynamic_form<L>>) {
                // runtime-shaped C (float32): the generated kernels for this channel count, if registered
                if (const auto* k = bn.template registered_kernels<L>(is_relu<Op>)) {
                    if (step->batch_stats)
                        k->train(step->form, step->policy, X.data(), Y.data(), step->moments, step->coeffs,
                                 step->work, registry::train_finalize::of(step->finalize), is_relu<Op>);
                    else
                        k->normalize(step->form, X.data(), Y.data(), step->coeffs, is_relu<Op>);
                    return;
                }
            }
            if (step->batch_stats)
                kernels::batch_norm_train(step->form, step->policy, X.data(), Y.data(), step->moments, step->coeffs,
                                          step->work, step->finalize, op);
            else
                kernels::normalize(step->form, 0, value_of(step->form.channels), X.data(), Y.data(), step->coeffs, op);
        }
    }

    /// What a conv call on views of VY's layout would run (describe()).
    template <class VY, class Conv>
    static registry::choice choose(const Conv& conv)
    {
        return conv.template choose<typename VY::layout_type>();
    }
};

} // namespace detail

/// Evaluates `e` into Y.
template <class VY, expr::node E>
void evaluate(const VY& Y, const E& e)
{
    using S = detail::split<E>;
    using In = std::remove_cvref_t<decltype(S::inner(e))>;
    const auto& in = S::inner(e);
    const auto op = S::op(e);
    if constexpr (detail::is_bn_of_conv_v<In>) {
        using BN = std::remove_pointer_t<decltype(in.module)>;
        if constexpr (BN::is_sync) detail::composer::conv_sync_bn(Y, *in.module, in.in, op);
        else detail::composer::conv_bn(Y, *in.module, in.in, op);
    } else if constexpr (detail::is_conv_v<In>) {
        detail::composer::conv(Y, in, op);
    } else if constexpr (detail::is_bn_v<In>) {
        static_assert(detail::is_leaf_v<std::remove_cvref_t<decltype(in.in)>>,
                      "vf::evaluate: batch norm applies to a tensor or a convolution's output");
        detail::composer::batch_norm(Y, *in.module, in.in.view, op);
    } else if constexpr (detail::is_affine_v<In>) {
        static_assert(detail::is_leaf_v<std::remove_cvref_t<decltype(in.in)>>,
                      "vf::evaluate: channel_affine applies to a tensor");
        const auto& X = in.in.view;
        detail::check_pointwise_io(X, Y);
        const index_t C = X.sizes()[1];
        if (static_cast<index_t>(in.scale.size()) != C || static_cast<index_t>(in.shift.size()) != C)
            throw error("channel_affine: scale and shift should contain " + std::to_string(C) + " elements not " +
                        std::to_string(in.scale.size()) + " and " + std::to_string(in.shift.size()));
        const auto f = X.form();
        kernels::transform_channels<1, 2>(f, 0, C, kernels::srcs<1>{X.data()},
                                          kernels::srcs<2>{in.scale.data(), in.shift.data()}, Y.data(),
                                          [op](const kernels::fvecs<1>& v, const kernels::fvecs<2>& p) {
                                              return op(simd::fma(v[0], p[0], p[1]));
                                          });
    } else if constexpr (detail::is_leaf_v<In>) {
        const auto& X = in.view;
        detail::check_pointwise_io(X, Y);
        const auto f = X.form();
        kernels::transform_channels<1, 0>(f, 0, value_of(f.channels), kernels::srcs<1>{X.data()}, kernels::srcs<0>{},
                                          Y.data(),
                                          [op](const kernels::fvecs<1>& v, const kernels::fvecs<0>&) { return op(v[0]); });
    } else {
        static_assert(detail::is_leaf_v<In>, "vf::evaluate: supported expressions are [epilogue](bn(X)), "
                                             "[epilogue](bn(conv(X))), [epilogue](conv(X)), "
                                             "[epilogue](channel_affine(X, scale, shift)) and epilogue(X)");
    }
}

namespace detail {
/// describe() for epi(conv(X)) and epi(bn(conv(X))).
template <class VY, class Conv>
std::string describe_conv(const VY& Y, const Conv& conv, const std::string& epi, const char* bn)
{
    namespace kc = kernels::conv;
    constexpr index_t width = simd::lanes<typename Conv::value_type>;
    const auto& g = conv.geom();
    const registry::choice choice = composer::choose<VY>(conv);
    const index_t vectors =
        std::min<index_t>(choice.schedule.tile_vectors, (g.out() + width - 1) / width);
    const index_t pixels = [&] {
        index_t p = 0;
        kc::with_vectors(vectors, [&]<int V>() { p = kc::pixels_for<V>; });
        return p;
    }();
    const bool stats = bn && std::string(bn).find("batch") != std::string::npos;
    const bool folded = bn && !stats;
    std::string out;
    auto line = [&](int depth, const std::string& t) { out += std::string(2 * depth, ' ') + t + "\n"; };
    const std::string what = bn ? "batch_norm[" + std::string(bn) + "](conv3d)" : std::string("conv3d");
    line(0, "evaluate: " + epi + "(" + what + ") -> " + std::string(VY::layout_name()) + " " + Y.shape().str() + ", " +
                conv.repr() + (std::remove_cvref_t<decltype(g)>::spec == conv_spec{} ? " (runtime-shaped)" : " (spec: static where fixed)"));
    line(0, "kernels: " + choice.why);
    line(0, "schedule: " + std::string(simd::arch::name()) + ", vector " + std::to_string(width) +
                (std::is_same_v<typename Conv::value_type, float> ? " x f32" : " x f64") + ", tile " + std::to_string(pixels) + " pixels x " + std::to_string(vectors) +
                " vectors in registers, threads " + std::to_string(get_num_threads()));
    line(1, choice.schedule.str() + ": " + choice.schedule.origin);
    if (std::string(VY::layout_name()) != "ndhwc") line(0, "reorder input to ndhwc (module buffer)");
    if (folded) line(0, "fold batch_norm into the packed weights and bias (PyTorch's fuse_conv_bn_weights)");
    line(0, stats ? "parallel for block of " + std::to_string(kc::moment_rows) + " output rows (n, od, oh):"
                  : "parallel for output row (n, od, oh):");
    line(1, "for oc chunk of " + std::to_string(vectors * width) + " channels:");
    line(2, "for ow tile of " + std::to_string(pixels) + " pixels (interior tiles unchecked, border tiles checked):");
    line(3, "for kd, kh, kw (taps outside the image skipped): for ic in [0, " + std::to_string(g.in()) + "):");
    line(4, "acc[p][j] = fma(broadcast(x[p][ic]), w[tap][ic][j], acc[p][j])");
    if (stats) {
        line(3, "z = acc + bias; store z (kept for backward)");
        line(3, "block sums of (z - K) and (z - K)^2 in double (K: the channel's first value in the block)");
        line(0, "merge block moments in block order (Chan); batch_norm: running statistics, coefficients");
        line(0, "for each element: y = " + epi + "(((z - mean_hi) - mean_lo) * alpha + beta)   # one sweep");
    } else {
        line(3, "y = " + epi + "(acc + bias); store y   # written once");
    }
    if (std::string(VY::layout_name()) != "ndhwc") line(0, "reorder output to " + std::string(VY::layout_name()));
    return out;
}
} // namespace detail

namespace detail {
/// describe() for [epi](bn(X)), [epi](channel_affine(X, ...)) and epi(X).
template <class VY, class In>
std::string describe_bn_and_pointwise(const VY& Y, const In& in, const std::string& epi)
{
    // The form the kernels run on: a static-C module specializes a dynamic-C view.
    const auto f = [&] {
        if constexpr (detail::is_bn_v<In>) {
            constexpr index_t SC = std::remove_pointer_t<decltype(in.module)>::static_channels;
            if constexpr (SC != dynamic) return Y.with_channels(fix<SC>).form();
            else return Y.form();
        } else {
            return Y.form();
        }
    }();
    const schedule s = schedule_for(f);
    using Form = decltype(f);
    const bool minor = Form::channel_minor;
    const std::string C = std::to_string(value_of(f.channels)) + (s.static_channels ? " (static)" : " (dynamic)");
    std::string out;
    auto line = [&](int depth, const std::string& t) { out += std::string(2 * depth, ' ') + t + "\n"; };
    std::string what;
    bool train = false;
    if constexpr (detail::is_bn_v<In>) {
        train = in.module->training() || !in.module->track_running_stats();
        what = "batch_norm[" + std::string(train ? "batch statistics" : "running statistics") + "]";
    } else if constexpr (detail::is_affine_v<In>) {
        what = "channel_affine";
    } else {
        what = "x";
    }
    line(0, "evaluate: " + epi + "(" + what + ") -> " + std::string(VY::layout_name()) + " " + Y.shape().str() +
                ", C = " + C);
    line(0, "schedule: " + std::string(s.arch) + ", vector " + std::to_string(s.vector_width) + " x f32, unroll " +
                std::to_string(s.unroll) + ", channel block " + std::to_string(s.channel_block) + ", threads " +
                std::to_string(s.threads) + (minor ? ", pixel block " + std::to_string(s.pixel_block) : std::string()));
    const std::string vec = std::to_string(s.vector_width);
    const bool blocked = Form::blocked;
    const std::string inner =
        blocked ? "for c in block step " + vec + " (" + std::to_string(s.unroll) + " vectors, unrolled at compile time):"
        : minor ? (s.channels_unrolled ? "for c in [0, C) step " + vec + " (unrolled at compile time):"
                                       : "for c in [0, C) step " + vec + ":")
                : "for i in [0, D*H*W) step " + vec + " (x" + std::to_string(s.unroll) + "):";
    const std::string outer = blocked ? "for n in [0, N): for p in [0, D*H*W):"
                              : minor ? "parallel for block in [0, N*D*H*W / " + std::to_string(s.pixel_block) +
                                            "): for p in block:"
                                      : "for n in [0, N):";
    auto pass = [&](int depth, const std::string& body) {
        line(depth, outer);
        line(depth + 1, inner);
        line(depth + 2, body);
    };
    int d = 0;
    if (blocked) {
        line(0, "parallel for block in [0, C/16):   # one 16-channel block's slice stays in cache across its passes");
        d = 1;
    } else if (!minor) {
        line(0, "parallel for c in [0, C):   # one channel's slice stays in cache across its passes");
        d = 1;
    }
    bool aten = false;
    if constexpr (detail::is_bn_v<In>) aten = in.module->stats_policy() == kernels::batch_stats_policy::aten;
    const std::string partials = "block partials added in block order   # same bits for any thread count";
    if (train && aten) {
        line(d, "statistics: policy aten (ATen's order and rounding)");
        pass(d, "sum += widen(x)                      # double accumulators");
        if (minor && !blocked) line(d, "sum = " + partials);
        line(d, "mean = float(sum / n)");
        pass(d, "var_sum += widen((x - mean)^2)       # double accumulators");
    } else if (train) {
        line(d, "statistics: policy fast (one read of x), shift = the channel's first value");
        pass(d, "s1 += x - shift, s2 += (x - shift)^2   # float runs of " + std::to_string(kernels::stats_run) +
                    " per lane, then double");
        if (minor && !blocked) line(d, "s1, s2 = " + partials);
        line(d, "mean = shift + s1 / n, M2 = s2 - s1^2 / n");
    }
    if (train) line(d, "finalize: invstd, alpha = invstd * gamma, running statistics   # PyTorch's rounding");
    if constexpr (detail::is_bn_v<In>) pass(d, "y = " + epi + "(((x - mean_hi) - mean_lo) * alpha + beta)   # one fma");
    else if constexpr (detail::is_affine_v<In>) pass(d, "y = " + epi + "(x * scale + shift)   # one fma");
    else pass(d, "y = " + epi + "(x)");
    return out;
}

} // namespace detail

/// The loop nest `evaluate(Y, e)` runs, as text (for micro-benchmarking layouts).
template <class VY, expr::node E>
std::string describe(const VY& Y, const E& e)
{
    using S = detail::split<E>;
    using In = std::remove_cvref_t<decltype(S::inner(e))>;
    const auto& in = S::inner(e);
    const std::string epi(S::epilogue::name);
    if constexpr (detail::is_conv_v<In>) {
        return detail::describe_conv(Y, *in.module, epi, nullptr);
    } else if constexpr (detail::is_bn_of_conv_v<In>) {
        const bool batch = in.module->training() || !in.module->track_running_stats();
        return detail::describe_conv(Y, *in.in.module, epi, batch ? "batch statistics" : "running statistics");
    } else {
        return detail::describe_bn_and_pointwise(Y, in, epi);
    }
}

} // namespace volfuse
