// volfuse::Conv3d: torch.nn.Conv3d's semantics (PyTorch 1.13, groups = 1) over
// volfuse views, float32 or float64 (the same kernel templates).  The module owns the weight in PyTorch's layout [out][in][kd][kh][kw]
// (so weights transfer as they are), the bias, their gradients, and the workspaces
// its kernels use; it validates every call before touching anything.
// Kernels run channels-last (kernels/conv3d.hpp): NDHWC views go straight in, NCDHW
// views are reordered into module-owned NDHWC buffers and back (as oneDNN reorders).
#pragma once

#include "../core/config.hpp"

#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "../core/checks.hpp"
#include "../core/error.hpp"
#include "../core/format.hpp"
#include "../expr/evaluate.hpp"
#include "../expr/nodes.hpp"
#include "../kernels/channel_loops.hpp"
#include "../kernels/conv3d.hpp"
#include "../kernels/reorder.hpp"
#include "../registry/registry.hpp"
#include "../schedule/build.hpp"
#include "../shape/conv_geometry.hpp"
#include "../shape/view.hpp"
#include "parameter.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

/// 3-D convolution, groups = 1.
/// @tparam Spec  what is fixed at compile time (conv_spec; all dynamic by default).
template <conv_spec Spec = conv_spec{}, class T = float>
class Conv3d {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "Conv3d<spec, T>: T is float or double");

public:
    using value_type = T;
    using geometry = conv_geometry<Spec>;
    static constexpr conv_spec spec = Spec;

    /// torch.nn.Conv3d's arguments, order and defaults.  PyTorch checks stride, padding,
    /// dilation and kernel size only when forward runs; these check them here, with
    /// PyTorch's messages, so a module that exists can run.
    Conv3d(index_t in_channels, index_t out_channels, size3 kernel_size, size3 stride = 1, size3 padding = 0,
           size3 dilation = 1, index_t groups = 1, bool bias = true)
        : g_{in_channels, out_channels, kernel_size, stride, padding, dilation}, has_bias_(bias)
    {
        if (groups <= 0) throw error("groups must be a positive integer");
        if (in_channels % groups != 0) throw error("in_channels must be divisible by groups");
        if (out_channels % groups != 0) throw error("out_channels must be divisible by groups");
        for (index_t v : {out_channels, in_channels, kernel_size.d, kernel_size.h, kernel_size.w})
            if (v < 0)
                throw error("Trying to create tensor with negative dimension " + std::to_string(v) + ": " +
                            weight_sizes());
        if (groups != 1)
            throw error("Conv3d: groups=" + std::to_string(groups) + " is not supported by volfuse (groups=1 only)");
        if (out_channels == 0)
            throw error("Given groups=1, expected weight to be at least 1 at dimension 0, but got weight of size " +
                        weight_sizes() + " instead");
        // PyTorch builds Conv3d(0, ...) with an uninitialized bias and gives its forward an output
        // of 0 channels whatever out_channels says: no semantics to follow, so volfuse refuses it.
        if (in_channels == 0)
            throw error("Conv3d: in_channels=0 is not supported (a convolution over no input channels; PyTorch leaves "
                        "the bias uninitialized and returns 0 output channels)");
        for (int i = 0; i < 3; ++i) {
            if (stride[i] <= 0) throw error("non-positive stride is not supported");
            if (padding[i] < 0) throw error("negative padding is not supported");
        }
        if (dilation.d <= 0 || dilation.h <= 0 || dilation.w <= 0)
            throw error("dilation should be greater than zero, but got [" + std::to_string(dilation.d) + ", " +
                        std::to_string(dilation.h) + ", " + std::to_string(dilation.w) + "]");
        if (kernel_size.d <= 0 || kernel_size.h <= 0 || kernel_size.w <= 0)
            throw error("kernel size should be greater than zero, but got: " + std::to_string(kernel_size.d) + " x " +
                        std::to_string(kernel_size.h) + " x " + std::to_string(kernel_size.w) + " (TxHxW)");
        check_spec(in_channels, Spec.in, "in_channels");
        check_spec(out_channels, Spec.out, "out_channels");
        check_spec(kernel_size, Spec.kernel, "kernel_size");
        check_spec(stride, Spec.stride, "stride");
        check_spec(padding, Spec.padding, "padding");
        check_spec(dilation, Spec.dilation, "dilation");
        // Every size this module derives from its arguments, computed once with overflow checks
        // (2 * padding and the dilated kernel extent enter every shape check; the weight and its
        // packed copies are allocated): after this, products of these never overflow.
        for (int i = 0; i < 3; ++i) {
            index_t twice = 0, span = 0;
            if (!detail::mul_ok(padding[i], 2, twice) || !detail::mul_ok(dilation[i], kernel_size[i] - 1, span) ||
                !detail::add_ok(span, 1, span))
                throw error("Conv3d: padding " + padding.str() + ", dilation " + dilation.str() + " and kernel_size " +
                            kernel_size.str() + " overflow a 64-bit size");
        }
        const index_t taps = detail::checked_numel(std::array<index_t, 3>{kernel_size.d, kernel_size.h, kernel_size.w});
        detail::checked_numel(std::array<index_t, 5>{out_channels, in_channels, kernel_size.d, kernel_size.h, kernel_size.w});
        detail::checked_numel(std::array<index_t, 3>{taps, in_channels, kernels::conv::round_up(out_channels, simd::lanes<T>)});
        detail::checked_numel(std::array<index_t, 3>{taps, out_channels, kernels::conv::round_up(in_channels, simd::lanes<T>)});
        const auto nw = static_cast<std::size_t>(out_channels * in_channels * g_.taps());
        weight_.resize(nw);
        weight_grad_.assign(nw, T(0));
        if (has_bias_) {
            bias_.resize(static_cast<std::size_t>(out_channels));
            bias_grad_.assign(static_cast<std::size_t>(out_channels), T(0));
        }
        reset_parameters();
        detail::warn_once_about_build(); // a build slower than the machine allows says so, once
    }
    /// `Conv3d<spec>()` when the spec fixes the channels and the kernel; stride, padding
    /// and dilation default as in PyTorch where the spec leaves them dynamic.
    Conv3d()
        requires(Spec.in != dynamic && Spec.out != dynamic && Spec.kernel.d != dynamic && Spec.kernel.h != dynamic &&
                 Spec.kernel.w != dynamic)
        : Conv3d(Spec.in, Spec.out, Spec.kernel, or_default(Spec.stride, 1), or_default(Spec.padding, 0),
                 or_default(Spec.dilation, 1))
    {
    }

    // --- configuration ------------------------------------------------------------------
    index_t in_channels() const noexcept { return g_.in(); }
    index_t out_channels() const noexcept { return g_.out(); }
    size3 kernel_size() const noexcept { return g_.k_; }
    size3 stride() const noexcept { return g_.s_; }
    size3 padding() const noexcept { return g_.p_; }
    size3 dilation() const noexcept { return g_.dil_; }
    bool has_bias() const noexcept { return has_bias_; }
    const geometry& geom() const noexcept { return g_; }

    /// PyTorch's repr: `Conv3d(3, 64, kernel_size=(7, 7, 7), stride=(2, 2, 2), padding=(3, 3, 3))`.
    std::string repr() const
    {
        std::string r = "Conv3d(" + std::to_string(g_.in()) + ", " + std::to_string(g_.out()) +
                        ", kernel_size=" + g_.k_.str() + ", stride=" + g_.s_.str();
        if (g_.p_ != size3(0)) r += ", padding=" + g_.p_.str();
        if (g_.dil_ != size3(1)) r += ", dilation=" + g_.dil_.str();
        if (!has_bias_) r += ", bias=False";
        return r + ")";
    }

    // --- parameters and gradients (PyTorch's layouts) ----------------------------------
    std::span<T> weight() noexcept { return weight_; }
    std::span<const T> weight() const noexcept { return weight_; }
    /// Empty when bias=false.
    std::span<T> bias() noexcept { return bias_; }
    std::span<const T> bias() const noexcept { return bias_; }
    std::span<const T> weight_grad() const noexcept { return weight_grad_; }
    std::span<const T> bias_grad() const noexcept { return bias_grad_; }
    /// weight and bias (PyTorch's order and names), for an optimizer (nn/training.hpp).
    std::vector<parameter> parameters()
    {
        std::vector<parameter> p{{"weight", weight_, weight_grad_}};
        if (has_bias_) p.push_back({"bias", bias_, bias_grad_});
        return p;
    }
    void zero_grad() noexcept
    {
        std::fill(weight_grad_.begin(), weight_grad_.end(), T(0));
        std::fill(bias_grad_.begin(), bias_grad_.end(), T(0));
    }

    /// PyTorch's initialization distribution (kaiming_uniform_(a=sqrt(5)): weight and bias
    /// uniform in +-1/sqrt(in * kd * kh * kw)) from a seeded generator; PyTorch's own
    /// random stream is not reproduced: load its weights to match it.
    void reset_parameters(std::uint64_t seed = 0)
    {
        std::mt19937_64 gen(seed);
        const T bound = T(1) / std::sqrt(static_cast<T>(g_.in() * g_.taps()));
        std::uniform_real_distribution<T> u(-bound, bound);
        for (auto& w : weight_) w = u(gen);
        for (auto& b : bias_) b = u(gen);
    }

    /// [N, out, OD, OH, OW] for an input of sizes [N, in, D, H, W] (PyTorch's formula).
    std::array<index_t, 5> output_sizes(const std::array<index_t, 5>& in) const noexcept
    {
        const auto o = g_.out_extents({in[2], in[3], in[4]});
        return {in[0], g_.out(), o[0], o[1], o[2]};
    }

    // --- compute --------------------------------------------------------------------------

    /// `conv(X)`: the convolution of X as an expression node, for vf::evaluate: `conv(X)`,
    /// `vf::relu(conv(X))`, and `[vf::relu](bn(conv(X)))` (the fused block, expr/evaluate.hpp).
    template <class V>
        requires is_view_v<V>
    expr::conv_output<Conv3d, expr::tensor<V>> operator()(const V& X) noexcept
    {
        return {this, {X}};
    }

    /// Y = conv3d(X, weight) + bias.  Y has output_sizes(X.sizes()) and does not overlap X.
    /// The same as vf::evaluate(Y, (*this)(X)).
    template <class VX, class VY>
    void forward(const VX& X, const VY& Y)
    {
        check_views<VX, VY>();
        evaluate(Y, (*this)(X));
    }

    /// Gradients of the conv at X for the output gradient dY: writes dX and adds into
    /// weight_grad() and bias_grad() (PyTorch's accumulation).  Uses the current weight.
    template <class VX, class VDY, class VDX>
    void backward(const VX& X, const VDY& dY, const VDX& dX)
    {
        check_views<VX, VDY>();
        check_views<VX, VDX>();
        static_assert(!std::is_const_v<typename VDX::value_type>, "Conv3d::backward: dX must be writable");
        check_backward(X, detail::operand_of(dY, "grad_output"), &dX);
        const T* dy = dY.shape().numel() > 0 ? channels_last(dY, dybuf_) : nullptr;
        const T* x = X.shape().numel() > 0 ? input_of(X) : nullptr;
        T* dx = channels_last_out(dX, xgbuf_);
        backward_channels_last<typename VX::layout_type>(X.sizes(), x, dy, dx);
        if (dx != dX.data() && X.shape().numel() > 0) reorder(ndhwc_view(static_cast<const T*>(dx), X.sizes()), dX);
    }

    /// torch.nn.grad.conv3d_input: the gradient of the input (dX, whose sizes are the
    /// input's) for the output gradient dY, with the current weight.  No grads change.
    template <class VDY, class VDX>
    void backward_input(const VDY& dY, const VDX& dX)
    {
        check_views<VDX, VDY>();
        static_assert(!std::is_const_v<typename VDX::value_type>, "Conv3d::backward_input: dX must be writable");
        const auto dy_arg = detail::operand_of(dY, "grad_output"), dx_arg = detail::operand_of(dX, "grad_input");
        check_input(dx_arg);
        const auto sz = dx_arg.sizes;
        check_other(dx_arg, dy_arg, output_sizes(sz));
        const T* dy = dY.shape().numel() > 0 ? channels_last(dY, dybuf_) : nullptr;
        T* dx = channels_last_out(dX, xgbuf_);
        grad_input_channels_last<typename VDX::layout_type>(sz, dy, dx);
        if (dx != dX.data() && dX.shape().numel() > 0) reorder(ndhwc_view(static_cast<const T*>(dx), sz), dX);
    }

    /// torch.nn.grad.conv3d_weight, plus the bias: adds the gradients of the weight and bias at
    /// input X for the output gradient dY into weight_grad() and bias_grad().
    template <class VX, class VDY>
    void backward_weight(const VX& X, const VDY& dY)
    {
        check_views<VX, VDY>();
        check_backward(X, detail::operand_of(dY, "grad_output"), static_cast<const VX*>(nullptr));
        const T* dy = dY.shape().numel() > 0 ? channels_last(dY, dybuf_) : nullptr;
        const T* x = X.shape().numel() > 0 ? input_of(X) : nullptr;
        backward_channels_last<typename VX::layout_type>(X.sizes(), x, dy, nullptr);
    }

    /// Runs every kernel of this module with `s` (clamped to what this build supports) instead
    /// of the tuned or default schedule: schedules change speed, never results.
    void set_schedule(const conv_schedule& s)
    {
        user_schedule_ = s.clamped();
        user_schedule_->origin = "set by Conv3d::set_schedule" + (s.origin.empty() ? "" : " (" + s.origin + ")");
        resolved_generation_ = 0;
    }
    /// Back to the tuned or default schedule.
    void reset_schedule() noexcept
    {
        user_schedule_.reset();
        resolved_generation_ = 0;
    }
    /// Which kernels the last call ran, and why (for micro-benchmarking and debugging).  Before
    /// any call, its `why` says so: kernel_choice(layout) answers without one.
    const registry::choice& kernel_choice() const noexcept { return choice_; }
    /// The kernels and schedule a call on views of `Layout` (vf::ncdhw, vf::ndhwc) would run.
    template <class Layout>
    registry::choice kernel_choice(Layout) const
    {
        return choose<Layout>();
    }
private:
    // --- the evaluator's and the fused block's side --------------------------------------
    friend struct detail::composer;
    template <conv_spec, index_t, class>
    friend class ConvBnReLU3d;
    using kernels_type = registry::basic_conv_kernels<T>;

    /// Validates forward(X -> the output y) and packs the weights (and padded bias) for the
    /// kernels.  Returns X's data as NDHWC (reordered into a module buffer for NCDHW).
    template <class VX>
    const T* prepare_forward(const VX& X, const detail::operand& y)
    {
        static_assert(is_view_v<VX>, "Conv3d: arguments must be volfuse views (vf::ncdhw_view, ...)");
        const auto x = detail::operand_of(X, "input");
        check_input(x);
        check_other(x, y, output_sizes(x.sizes));
        packed_.resize(static_cast<std::size_t>(g_.taps() * g_.in() * ocp()));
        bias_padded_.assign(static_cast<std::size_t>(ocp()), T(0));
        std::copy(bias_.begin(), bias_.end(), bias_padded_.begin());
        kernels::conv::pack(g_, weight_.data(), packed_.data());
        return X.shape().numel() > 0 ? input_of(X) : X.data();
    }
    /// X's data as NDHWC: X's own memory, or (other layouts) a copy in a module buffer.
    template <class VX>
    const T* input_of(const VX& X)
    {
        if (!is_channels_last(X)) ++input_copy_stamp_;
        return channels_last(X, xbuf_);
    }
    /// Whether V's memory already is NDHWC: an ndhwc view, or one channel in NCDHW ([N, 1, D,
    /// H, W] and NDHWC [N, D, H, W, 1] are the same memory: a first layer's input needs no
    /// reorder; nCdhw16c pads a channel to 16 lanes, so it always reorders).
    template <class V>
    static bool is_channels_last(const V& v) noexcept
    {
        using L = typename V::layout_type;
        return std::is_same_v<L, ndhwc_t> || (std::is_same_v<L, ncdhw_t> && v.sizes()[1] == 1);
    }
    /// The NDHWC copy input_of last made, and a stamp that changes whenever it is remade: the
    /// fused block's backward reuses its forward's copy when the stamp has not moved.
    const T* input_copy() const noexcept { return xbuf_.data(); }
    std::uint64_t input_copy_stamp() const noexcept { return input_copy_stamp_; }
    /// Validates backward(X, dY, dX)'s arguments (dX null: backward_weight's) and computes
    /// nothing: what the fused block checks before any part of its backward writes.
    template <class VX, class VDX>
    void check_backward(const VX& X, const detail::operand& dy, const VDX* dX, std::string_view who = "Conv3d") const
    {
        const auto x = detail::operand_of(X, "input");
        check_input(x);
        check_other(x, dy, output_sizes(x.sizes), who);
        if (dX) {
            const auto dx = detail::operand_of(*dX, "grad_input");
            check_other(x, dx, x.sizes, who);
            detail::check_disjoint(dx, dy);
        }
    }
    /// The kernels and schedule for a call on `Layout` views, and why: the instantiation for
    /// Spec when it fixes anything, else what the registry holds for this shape (generated by
    /// gen/) or the runtime-shaped fallback; the schedule set_schedule gave, else the one
    /// volfuse_gen --tune measured for this layer on this CPU class, else this CPU's default.
    template <class Layout>
    registry::choice choose() const
    {
        registry::choice c;
        if constexpr (!std::is_same_v<T, float>) {
            // The registry and gen/ hold float32 kernels; other types run this class's own instantiation.
            c = {nullptr, Spec != conv_spec{},
                 Spec != conv_spec{} ? "specialized: compile-time conv_spec of this Conv3d (float64)"
                                     : "runtime-shaped fallback: float64 (the registry holds float32 kernels)",
                 nullptr, host_conv_schedule()};
        } else if constexpr (Spec == conv_spec{}) {
            registry::key k{registry_op_, g_.in(), g_.out(), g_.k_, g_.s_, g_.p_, g_.dil_, std::string(Layout::name)};
            c = registry::global().lookup(k);
        } else {
            static const registry::conv_kernels k = registry::conv_kernels_for<Spec>();
            c = {&k, true, "specialized: compile-time conv_spec of this Conv3d", nullptr, host_conv_schedule()};
        }
        if (user_schedule_) c.schedule = *user_schedule_;
        return c;
    }
    /// choose(), remembered for kernel_choice(): resolved once per layout and kept until the
    /// registry changes (registry::generation(): one atomic load per call, no lookup).
    template <class Layout>
    const kernels_type& kernels_for()
    {
        const std::uint64_t g = registry::generation();
        if (resolved_generation_ != g || resolved_layout_ != Layout::name) {
            choice_ = choose<Layout>();
            resolved_generation_ = g;
            resolved_layout_ = Layout::name;
        }
        if constexpr (std::is_same_v<T, float>) {
            return *choice_.kernels;
        } else {
            static const kernels_type k = registry::conv_kernels_for<Spec, T>();
            return k;
        }
    }
    /// The forward kernel on NDHWC data x (input sizes `in`) into y, with the weights
    /// prepare_forward (or fold) packed, the epilogue ReLU or identity, and optionally the
    /// per-channel moments of what it stores (kernels::conv::forward).
    template <class Layout>
    void run_forward(const std::array<index_t, 5>& in, const T* x, T* y, bool relu,
                     double* moments = nullptr)
    {
        const auto out = output_sizes(in);
        const auto& k = kernels_for<Layout>();
        k.forward(dynamic_geom(), choice_.schedule, in[0], extents(in), extents(out), x, packed_weight(),
                  packed_bias(), y, relu, moments);
    }
    /// The run-time geometry the registry's kernels take.
    registry::dynamic_geometry dynamic_geom() const noexcept { return {g_.in_, g_.out_, g_.k_, g_.s_, g_.p_, g_.dil_}; }
    /// The op this conv is looked up as: `conv`, or `conv_bn_relu` inside the fused block.
    void set_registry_op(registry::op o) noexcept
    {
        registry_op_ = o;
        resolved_generation_ = 0;
    }

    /// Weights and bias as prepare_forward (or fold) packed them; bias null without one.
    const T* packed_weight() const noexcept { return packed_.data(); }
    const T* packed_bias() const noexcept { return has_bias_ || folded_ ? bias_padded_.data() : nullptr; }

    /// Packs weight and bias with an inference BatchNorm3d folded in, as PyTorch's
    /// torch.nn.utils.fusion.fuse_conv_bn_weights: s = bn_w * rsqrt(rv + eps),
    /// W' = W * s[oc], b' = (b - rm) * rsqrt(rv + eps) * bn_w + bn_b, in T.
    /// Call after prepare_forward; packed_bias() then returns b'.
    template <class BN>
    void fold(const BN& bn)
    {
        const index_t OC = g_.out(), per = g_.in() * g_.taps(), P = ocp();
        const auto rm = bn.running_mean(), rv = bn.running_var();
        for (index_t oc = 0; oc < OC; ++oc) {
            const T rsq = T(1) / std::sqrt(rv[oc] + static_cast<T>(bn.eps()));
            const T w = bn.affine() ? bn.weight()[oc] : T(1), b = bn.affine() ? bn.bias()[oc] : T(0);
            const T scale = w * rsq;
            for (index_t i = 0; i < per; ++i) packed_[kernels::conv::blocked_offset<T>(per, P, i, oc)] *= scale;
            bias_padded_[oc] = ((has_bias_ ? bias_[oc] : T(0)) - rm[oc]) * rsq * w + b;
        }
        folded_ = true;
    }
    /// Where an NDHWC result for Y goes: Y's memory, or a module buffer for NCDHW.
    template <class VY>
    T* output_for(const VY& Y)
    {
        return channels_last_out(Y, ybuf_);
    }
    /// Moves an NDHWC result at y (from output_for(Y)) into Y; clears a fold.
    template <class VY>
    void finish_output(const T* y, const VY& Y)
    {
        folded_ = false;
        if (y != Y.data() && Y.shape().numel() > 0) reorder(ndhwc_view(y, Y.sizes()), Y);
    }
    /// Where a fused forward keeps its conv output for backward (n elements, NDHWC): the
    /// caller's memory named by keep_output_in, else the module's buffer; kept_buffer is always
    /// the module's (scratch for a recomputed output).  And workspace for the statistics of the
    /// kernel's epilogue.
    T* kept_output(index_t n) { return kept_at_ ? kept_at_ : kept_buffer(n); }
    T* kept_buffer(index_t n)
    {
        kept_.resize(static_cast<std::size_t>(n));
        return kept_.data();
    }
    /// The next fused forwards keep their output at z (n elements, sized and disjoint from
    /// their operands as the caller checked) instead of the module's buffer; nullptr: the buffer.
    void keep_output_in(T* z, index_t n) noexcept { kept_at_ = z, kept_at_n_ = z ? n : 0; }
    const T* kept_data() const noexcept { return kept_at_ ? kept_at_ : kept_.data(); }
    std::size_t kept_size() const noexcept
    {
        return kept_at_ ? static_cast<std::size_t>(kept_at_n_) : kept_.size();
    }
    double* moments(index_t rows)
    {
        moments_.resize(static_cast<std::size_t>(kernels::conv::moments_workspace<T>(rows, g_.out())));
        return moments_.data();
    }

    /// backward on NDHWC data (x, dy may be null when empty): dx written unless null, grads
    /// accumulated.  Nothing is written before every workspace is allocated.
    template <class Layout = ndhwc_t>
    void backward_channels_last(const std::array<index_t, 5>& sz, const T* x, const T* dy, T* dx)
    {
        const auto osz = output_sizes(sz);
        const index_t N = sz[0];
        const auto in = extents(sz), out = extents(osz);
        index_t n_in = 1, n_out = 1;
        for (int i = 0; i < 5; ++i) n_in *= sz[i], n_out *= osz[i];
        // Workspaces first (the steps that may allocate), then no state changes until all is computed.
        reserve_backward<Layout>(sz);
        std::fill(gw_.begin(), gw_.end(), T(0));
        if (n_in == 0) return;
        if (dx) grad_input_channels_last<Layout>(sz, dy, dx);
        if (n_out == 0) return;
        kernels::conv::pad_input(g_, N, in, x, xpad_.data());
        const auto& k = kernels_for<Layout>();
        k.grad_weight(dynamic_geom(), choice_.schedule, N, in, out, xpad_.data(), dy, gw_.data(), gwork_.data(),
                      static_cast<index_t>(gwork_.size()));
        // Bias: per-channel sums of dY in double (kernels::reduce_channels over an NDHWC form).
        if (has_bias_) {
            const auto f = ndhwc_view(dy, osz).form();
            kernels::reduce_channels<1, 1, 0>(
                f, 0, g_.out(), kernels::srcs<1, T>{dy}, kernels::srcs<0, T>{},
                [](const kernels::vecs<1, T>& v, const kernels::vecs<0, T>&) { return v; }, work_.data(),
                kernels::reduce_stride(g_.out()));
            for (index_t oc = 0; oc < g_.out(); ++oc) bias_grad_[oc] += static_cast<T>(work_[oc]);
        }
        const index_t IC = g_.in(), taps = g_.taps();
        for (index_t oc = 0; oc < g_.out(); ++oc)
            for (index_t ic = 0; ic < IC; ++ic)
                for (index_t t = 0; t < taps; ++t)
                    weight_grad_[(oc * IC + ic) * taps + t] += gw_[(t * IC + ic) * ocp() + oc];
    }

    /// Allocates every workspace backward_channels_last<Layout> needs for input sizes sz (so
    /// that a caller can allocate before it commits anything).
    template <class Layout>
    void reserve_backward(const std::array<index_t, 5>& sz)
    {
        const index_t nw = g_.taps() * g_.in() * ocp();
        packed_.resize(static_cast<std::size_t>(std::max(nw, g_.taps() * g_.out() * icp())));
        gw_.resize(static_cast<std::size_t>(nw));
        xpad_.resize(static_cast<std::size_t>(kernels::conv::padded_size(g_, sz[0], extents(sz))));
        kernels_for<Layout>(); // the schedule grad weight's workspace depends on
        gwork_.resize(static_cast<std::size_t>(
            kernels::conv::grad_weight_workspace<T>(g_, choice_.schedule, extents(output_sizes(sz)), get_num_threads())));
        if (has_bias_)
            work_.resize(static_cast<std::size_t>(
                kernels::reduce_workspace(ndhwc_view(static_cast<const T*>(nullptr), output_sizes(sz)).form(), 1)));
    }
    /// Where an NDHWC grad input for dX goes: dX's memory, or a module buffer (reorder after).
    template <class VDX>
    T* grad_input_for(const VDX& dX)
    {
        return channels_last_out(dX, xgbuf_);
    }

    /// grad input on NDHWC data: dx (input sizes sz) for dy (null when empty).
    template <class Layout = ndhwc_t>
    void grad_input_channels_last(const std::array<index_t, 5>& sz, const T* dy, T* dx)
    {
        const auto osz = output_sizes(sz);
        index_t n_in = 1, n_out = 1;
        for (int i = 0; i < 5; ++i) n_in *= sz[i], n_out *= osz[i];
        packed_.resize(static_cast<std::size_t>(std::max(g_.taps() * g_.in() * ocp(), g_.taps() * g_.out() * icp())));
        if (n_in == 0) return;
        if (n_out == 0) {
            std::fill(dx, dx + n_in, T(0));
            return;
        }
        kernels::conv::pack(g_, weight_.data(), packed_.data(), kernels::conv::grad_input_packing(g_));
        const auto& k = kernels_for<Layout>();
        k.grad_input(dynamic_geom(), choice_.schedule, sz[0], extents(sz), extents(osz), dy, packed_.data(), dx);
    }

    static constexpr size3 or_default(size3 v, index_t d) noexcept
    {
        return {v.d == dynamic ? d : v.d, v.h == dynamic ? d : v.h, v.w == dynamic ? d : v.w};
    }
    static void check_spec(index_t got, index_t fixed, const char* name)
    {
        if (fixed != dynamic && got != fixed)
            throw error("Conv3d<spec>: the spec fixes " + std::string(name) + " = " + std::to_string(fixed) +
                        ", the constructor got " + std::to_string(got));
    }
    static void check_spec(size3 got, size3 fixed, const char* name)
    {
        for (int i = 0; i < 3; ++i)
            if (fixed[i] != dynamic && got[i] != fixed[i])
                throw error("Conv3d<spec>: the spec fixes " + std::string(name) + "[" + std::to_string(i) +
                            "] = " + std::to_string(fixed[i]) + ", the constructor got " + got.str());
    }

    std::string weight_sizes() const
    {
        const std::array<index_t, 5> s{g_.out_, g_.in_, g_.k_.d, g_.k_.h, g_.k_.w};
        return detail::sizes_str(s);
    }
    index_t ocp() const noexcept { return kernels::conv::round_up(g_.out(), simd::lanes<T>); }
    index_t icp() const noexcept { return kernels::conv::round_up(g_.in(), simd::lanes<T>); }
    static kernels::conv::extents3 extents(const std::array<index_t, 5>& s) noexcept { return {s[2], s[3], s[4]}; }

    template <class VA, class VB>
    static constexpr void check_views()
    {
        static_assert(is_view_v<VA> && is_view_v<VB>, "Conv3d: arguments must be volfuse views (vf::ncdhw_view, ...)");
        static_assert(std::is_same_v<typename VA::layout_type, typename VB::layout_type>,
                      "Conv3d: all tensors of one call must have the same layout");
        static_assert(std::is_same_v<std::remove_const_t<typename VA::value_type>, T> &&
                          std::is_same_v<std::remove_const_t<typename VB::value_type>, T>,
                      "Conv3d<spec, T>: tensors of the module's element type T only");
    }

    /// PyTorch's input checks, in its order, on a checked operand (sizes valid, data not null):
    /// channels, then kernel against padded input (the sum overflow-checked).
    void check_input(const detail::operand& x) const
    {
        const auto& s = x.sizes;
        if (s[1] != g_.in())
            throw error("Given groups=1, weight of size " + weight_sizes() + ", expected input" + detail::sizes_str(s) +
                        " to have " + std::to_string(g_.in()) + " channels, but got " + std::to_string(s[1]) +
                        " channels instead");
        const index_t p2[3] = {2 * g_.template p<0>(), 2 * g_.template p<1>(), 2 * g_.template p<2>()};
        index_t pd = 0, ph = 0, pw = 0;
        if (!detail::add_ok(s[2], p2[0], pd) || !detail::add_ok(s[3], p2[1], ph) || !detail::add_ok(s[4], p2[2], pw))
            throw error("Calculated padded input size per channel overflows a 64-bit size: input " +
                        detail::sizes_str(s) + ", padding " + g_.p_.str());
        const index_t kd = g_.template dil<0>() * (g_.template k<0>() - 1) + 1,
                      kh = g_.template dil<1>() * (g_.template k<1>() - 1) + 1,
                      kw = g_.template dil<2>() * (g_.template k<2>() - 1) + 1;
        if (pd < kd || ph < kh || pw < kw)
            throw error("Calculated padded input size per channel: (" + std::to_string(pd) + " x " +
                        std::to_string(ph) + " x " + std::to_string(pw) + "). Kernel size: (" + std::to_string(kd) +
                        " x " + std::to_string(kh) + " x " + std::to_string(kw) +
                        "). Kernel size can't be greater than actual input size");
        // An empty spatial extent with padding could still give outputs (all padding): PyTorch
        // refuses that input, and so does volfuse.
        if (s[2] == 0 || s[3] == 0 || s[4] == 0)
            if (s[0] != 0)
                throw error("Only zero batch or zero channel inputs are supported, but got input shape: " +
                            detail::sizes_str(s));
    }
    /// Another tensor of the call: its expected shape, disjoint from the tensor with the
    /// input's sizes (`x`: the input, or grad_input for backward_input).
    static void check_other(const detail::operand& x, const detail::operand& a, const std::array<index_t, 5>& want,
                            std::string_view who = "Conv3d")
    {
        detail::check_sizes(a, want, who, x.sizes);
        detail::check_disjoint(a, x);
    }

    /// The data of V as NDHWC: V's own memory, or a reorder into `buf`.
    template <class V>
    static const T* channels_last(const V& v, std::vector<T>& buf)
    {
        if (is_channels_last(v)) return v.data();
        buf.resize(static_cast<std::size_t>(v.shape().numel()));
        reorder(v, ndhwc_view(buf.data(), v.sizes()));
        return buf.data();
    }
    /// Where to write an NDHWC result for V: V's own memory, or `buf` (reordered into V after).
    template <class V>
    static T* channels_last_out(const V& v, std::vector<T>& buf)
    {
        if (is_channels_last(v)) return v.data();
        buf.resize(static_cast<std::size_t>(v.shape().numel()));
        return buf.data();
    }

    geometry g_;
    bool has_bias_;
    std::vector<T> weight_, bias_, weight_grad_, bias_grad_;
    // Workspaces, reused across calls: packed weights, padded bias, grad-weight
    // accumulators, NDHWC copies of NCDHW operands, the input with its padding made explicit
    // (grad weight), bias-grad sums.
    std::vector<T> packed_, bias_padded_, gw_, xbuf_, ybuf_, dybuf_, xgbuf_, kept_, xpad_, gwork_;
    T* kept_at_ = nullptr; // the caller's memory for the kept output (keep_output_in)
    index_t kept_at_n_ = 0;
    std::vector<double> work_, moments_;
    std::uint64_t input_copy_stamp_ = 0;
    bool folded_ = false; // packed_/bias_padded_ hold a BatchNorm3d folded in (until finish_output)
    registry::op registry_op_ = registry::op::conv;
    registry::choice choice_{nullptr, false, "no call yet: kernel_choice(vf::ncdhw) or kernel_choice(vf::ndhwc) "
                                             "says what a call would run"};
    std::uint64_t resolved_generation_ = 0; // choice_ is valid for this registry generation ...
    std::string_view resolved_layout_;      // ... and layout
    std::optional<conv_schedule> user_schedule_;
};

} // namespace volfuse
