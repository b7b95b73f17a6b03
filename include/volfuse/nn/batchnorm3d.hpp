// volfuse::BatchNorm3d: torch.nn.BatchNorm3d's semantics (PyTorch 1.13) over
// volfuse views.  The module owns parameters, running statistics, gradients and
// what backward needs from forward; it validates every call before touching
// anything, then hands the work to the kernels.
#pragma once

#include "../core/config.hpp"

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "../core/checks.hpp"
#include "../core/error.hpp"
#include "../core/format.hpp"
#include "../expr/evaluate.hpp"
#include "../expr/nodes.hpp"
#include "../kernels/batch_norm.hpp"
#include "../registry/registry.hpp"
#include "../schedule/build.hpp"
#include "../shape/view.hpp"
#include "batch_norm_rules.hpp"
#include "parameter.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

using kernels::batch_stats_policy;

template <index_t StaticC, class T>
class SyncBatchNorm3d;

namespace detail {
struct saved_forward;
}

/// Batch normalization over (N, D, H, W) per channel of a 5-D tensor.
/// @tparam StaticC  channel count fixed at compile time (kernels specialized
///                  for it), or `dynamic` (the default) for a run-time count.
/// @tparam T        element type of tensors, parameters and buffers: float (the default) or
///                  double (PyTorch's module.double(); the same kernel templates).
template <index_t StaticC = dynamic, class T = float>
class BatchNorm3d {
    static_assert(StaticC == dynamic || StaticC >= 0, "BatchNorm3d<C>: C must be >= 0 or vf::dynamic");
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "BatchNorm3d<C, T>: T is float or double");

public:
    using value_type = T;
    static constexpr index_t static_channels = StaticC;
    static constexpr bool is_sync = false; // SyncBatchNorm3d's is true (the evaluator composes it differently)

    /// Same arguments and defaults as torch.nn.BatchNorm3d; momentum = nullopt is
    /// PyTorch's momentum=None (cumulative moving average).
    explicit BatchNorm3d(index_t num_features, double eps = 1e-5, std::optional<double> momentum = 0.1,
                         bool affine = true, bool track_running_stats = true)
        : C_(num_features), eps_(eps), momentum_(momentum), affine_(affine), track_(track_running_stats)
    {
        if (num_features < 0)
            throw error("Trying to create tensor with negative dimension " + std::to_string(num_features) + ": [" +
                        std::to_string(num_features) + "]");
        if (StaticC != dynamic && num_features != StaticC)
            throw error("BatchNorm3d<" + std::to_string(StaticC) + "> has " + std::to_string(StaticC) +
                        " channels, not num_features=" + std::to_string(num_features));
        if (affine_) {
            weight_.resize(C_);
            bias_.resize(C_);
            weight_grad_.assign(C_, T(0));
            bias_grad_.assign(C_, T(0));
        }
        if (track_) {
            running_mean_.resize(C_);
            running_var_.resize(C_);
        }
        reserve(C_);
        reset_parameters();
        detail::warn_once_about_build(); // a build slower than the machine allows says so, once
    }
    /// `BatchNorm3d<64>{}`: num_features taken from the template argument.
    BatchNorm3d() requires(StaticC != dynamic) : BatchNorm3d(StaticC) {}

    // --- mode ---------------------------------------------------------------
    void train(bool mode = true) noexcept { training_ = mode; }
    void eval() noexcept { training_ = false; }
    bool training() const noexcept { return training_; }

    // --- configuration ------------------------------------------------------
    index_t num_features() const noexcept { return C_; }
    double eps() const noexcept { return eps_; }
    std::optional<double> momentum() const noexcept { return momentum_; }
    bool affine() const noexcept { return affine_; }
    bool track_running_stats() const noexcept { return track_; }

    /// `BatchNorm3d(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)`.
    std::string repr() const
    {
        auto b = [](bool v) { return v ? std::string("True") : std::string("False"); };
        return "BatchNorm3d(" + std::to_string(C_) + ", eps=" + detail::python_repr(eps_) +
               ", momentum=" + (momentum_ ? detail::python_repr(*momentum_) : std::string("None")) +
               ", affine=" + b(affine_) + ", track_running_stats=" + b(track_) + ")";
    }

    // --- parameters and buffers (size C; empty when not affine / not tracking) ---
    std::span<T> weight() noexcept { return weight_; }
    std::span<T> bias() noexcept { return bias_; }
    std::span<T> running_mean() noexcept { return running_mean_; }
    std::span<T> running_var() noexcept { return running_var_; }
    std::span<const T> weight() const noexcept { return weight_; }
    std::span<const T> bias() const noexcept { return bias_; }
    std::span<const T> running_mean() const noexcept { return running_mean_; }
    std::span<const T> running_var() const noexcept { return running_var_; }
    std::int64_t num_batches_tracked() const noexcept { return nbt_; }
    /// For loading a checkpoint (PyTorch's num_batches_tracked buffer).
    void set_num_batches_tracked(std::int64_t v) noexcept { nbt_ = v; }

    std::span<const T> weight_grad() const noexcept { return weight_grad_; }
    std::span<const T> bias_grad() const noexcept { return bias_grad_; }
    /// weight and bias (none without affine), for an optimizer (nn/training.hpp).
    std::vector<basic_parameter<T>> parameters()
    {
        if (!affine_) return {};
        return {{"weight", weight_, weight_grad_}, {"bias", bias_, bias_grad_}};
    }
    void zero_grad() noexcept
    {
        std::fill(weight_grad_.begin(), weight_grad_.end(), T(0));
        std::fill(bias_grad_.begin(), bias_grad_.end(), T(0));
    }

    /// How training statistics are summed: batch_stats_policy::fast (the default: one read of
    /// the input, float runs merged in double, shifted) or batch_stats_policy::aten (ATen's
    /// order and rounding: running statistics equal PyTorch 1.13's bits on contiguous NCDHW).
    /// docs/batchnorm.md says what each costs and guarantees.
    void set_stats_policy(batch_stats_policy p) noexcept { policy_ = p; }
    batch_stats_policy stats_policy() const noexcept { return policy_; }

    void reset_running_stats() noexcept
    {
        std::fill(running_mean_.begin(), running_mean_.end(), T(0));
        std::fill(running_var_.begin(), running_var_.end(), T(1));
        nbt_ = 0;
    }
    void reset_parameters() noexcept
    {
        reset_running_stats();
        std::fill(weight_.begin(), weight_.end(), T(1));
        std::fill(bias_.begin(), bias_.end(), T(0));
    }

    // --- compute -------------------------------------------------------------

    /// `bn(X)`: the batch norm of X as an expression node, for vf::evaluate / vf::describe
    /// (`vf::evaluate(Y, vf::relu(bn(X)))` runs the same kernels as forward(X, Y, vf::relu)).
    template <class V>
        requires is_view_v<V>
    expr::batch_norm<BatchNorm3d, expr::tensor<V>> operator()(const V& X) noexcept
    {
        return {this, {X}};
    }
    /// `bn(conv(X))`: batch norm of a convolution's output (the fused Conv3d -> BatchNorm3d block).
    template <class M, class I>
    expr::batch_norm<BatchNorm3d, expr::conv_output<M, I>> operator()(const expr::conv_output<M, I>& c) noexcept
    {
        return {this, c};
    }

    /// Y = epi(BatchNorm3d(X)).  Y may be X itself (in place).  Training (or eval
    /// without running statistics) normalizes with batch statistics; training with
    /// tracking updates running_mean/var and num_batches_tracked.
    /// The same as vf::evaluate(Y, epi((*this)(X))): the evaluator picks the kernels.
    template <class VX, class VY, expr::epilogue Epi = expr::identity_t>
    void forward(const VX& X, const VY& Y, Epi epi = {})
    {
        check_views<VX, VY>();
        evaluate(Y, expr::pointwise<Epi, expr::batch_norm<BatchNorm3d, expr::tensor<VX>>>{epi, (*this)(X)});
    }

    /// Backward of the last forward on X, through the epilogue that forward applied (`epi`
    /// must be it): writes dX and accumulates weight_grad()/bias_grad().  dX may be the same
    /// memory as dY.
    template <class VX, class VDY, class VDX, expr::epilogue Epi = expr::identity_t>
    void backward(const VX& X, const VDY& dY, const VDX& dX, Epi epi = {})
    {
        check_backward(X, dY, dX, epi);
        if (X.shape().numel() == 0) return;
        run_backward(specialize(X.as_const()), dY.data(), dX.data(), epi);
    }

    /// Which kernels the last call ran, and why.  Before any call, its `why` says so:
    /// kernel_choice(layout, relu) answers without one.
    const registry::choice& kernel_choice() const noexcept { return choice_; }
    /// What a forward or backward on views of `L` (with relu or not) would run.
    template <class L>
    registry::choice kernel_choice(L, bool relu = false) const
    {
        if constexpr (StaticC != dynamic || !std::is_same_v<T, float>) return choice_;
        else if (const registry::entry* e = adopted_.entry;
                 e && adopted_.generation == registry::generation() && kernels_of<L>(*e).normalize)
            return block_choice(*e);
        else return registry::global().lookup(registry_key<L>(relu));
    }

private:
    // --- the evaluator's and the fused block's side --------------------------------------
    friend struct detail::composer;
    template <conv_spec, index_t, class>
    friend class ConvBnReLU3d;
    template <index_t, class>
    friend class SyncBatchNorm3d; // composes the same phases around its all-gathers
    friend struct detail::saved_forward; // moves what backward needs in and out (the PyTorch ops)

    /// Every check backward(X, dY, dX, epi) makes, nothing written.
    template <class VX, class VDY, class VDX, class Epi>
    void check_backward(const VX& X, const VDY& dY, const VDX& dX, Epi) const
    {
        check_views<VX, VDY>();
        check_views<VX, VDX>();
        static_assert(!std::is_const_v<typename VDX::value_type>, "BatchNorm3d::backward: dX must be writable");
        if (!saved_.valid)
            throw error("BatchNorm3d::backward called without a matching forward: run forward(X, Y) first");
        const auto dy = detail::operand_of(dY, "grad_output"), dx = detail::operand_of(dX, "grad_input");
        check_io(detail::operand_of(X, "input"), {dy, dx});
        if (X.sizes() != saved_.sizes || VX::layout_name() != saved_.layout)
            throw error("BatchNorm3d::backward: input " + std::string(VX::layout_name()) + " " + X.shape().str() +
                        " does not match the last forward's input " + std::string(saved_.layout) + " " +
                        detail::sizes_str(saved_.sizes));
        if (saved_.in_place && static_cast<const void*>(X.data()) == saved_.x)
            throw error("BatchNorm3d::backward: the last forward ran in place and overwrote its input; "
                        "backward needs the forward's input X (run forward out of place when training)");
        if (static_cast<const void*>(X.data()) != saved_.x)
            throw error("BatchNorm3d::backward: X is not the input of the last forward");
        if (dx.data != dy.data && dx.overlaps(dy))
            throw error("BatchNorm3d::backward: grad_input partially overlaps grad_output");
        if (Epi::name != saved_.epilogue)
            throw error("BatchNorm3d::backward: the last forward applied " + std::string(saved_.epilogue) +
                        " after the batch norm but backward was given " + std::string(Epi::name) +
                        " (pass backward the forward's epilogue, e.g. forward(X, Y, vf::relu) with "
                        "backward(X, dY, dX, vf::relu))");
    }

    /// The finalization phase, written once for every composition (this module's training
    /// kernels, the fused block's conv-epilogue moments, SyncBatchNorm3d's merged moments):
    /// channels' batch statistics -> the normalize coefficients, the invstd backward needs, and
    /// the running statistics, with ATen's rounding.
    struct train_finalizer {
        BatchNorm3d* m;
        index_t n;      // values per channel (the global count for SyncBatchNorm3d)
        bool update;    // training with running statistics
        T momentum;     // this step's factor (momentum, or 1/num_batches_tracked)
        /// mean in double; var_sum as ATen's: squared deviations from T(mean), in double.
        void channel(index_t c, double mean, double var_sum) const noexcept
        {
            const T mean_f = static_cast<T>(mean), vs = static_cast<T>(var_sum);
            m->mean_[c] = mean_f;
            m->mean_lo_[c] = static_cast<T>(mean - mean_f);
            const T invstd = nn::rules::train_invstd(vs, n, m->eps_);
            m->invstd_[c] = invstd;
            m->alpha_[c] = nn::rules::scale(invstd, m->gamma_[c]);
            m->beta_[c] = m->bias_of(c);
            if (update) {
                m->running_mean_[c] = nn::rules::update_running_mean(m->running_mean_[c], mean_f, momentum);
                m->running_var_[c] = nn::rules::update_running_var(m->running_var_[c], vs, n, momentum);
            }
        }
        /// Channels [c0, c1) from the statistics phase's arrays (stat_mean_, stat_m2_ = var_sum).
        void operator()(index_t c0, index_t c1) const noexcept
        {
            for (index_t c = c0; c < c1; ++c) channel(c, m->stat_mean_[c], m->stat_m2_[c]);
        }
    };
    /// One forward as the module hands it to the evaluator: the form to run on
    /// (static C specialized), which kernel, and the state it reads and writes.
    template <class Form>
    struct forward_step {
        using form_type = Form;
        Form form;
        bool batch_stats;           // batch statistics (kernels::batch_norm_train) or running ones (normalize)
        kernels::batch_stats_policy policy;
        kernels::moments_out<T> moments;  // the statistics phase's output (C each)
        kernels::bn_coeffs_out<T> coeffs; // filled by the finalization, here for running statistics
        double* work;
        train_finalizer finalize;
    };

    /// Validates forward(X -> Y) through the epilogue named `epilogue` and commits everything
    /// but the kernels' work: after this returns, the kernels (noexcept) cannot fail.  Empty
    /// when X has no elements.
    template <class VX, class VY>
    auto prepare_forward(const VX& X, const VY& Y, std::string_view epilogue)
    {
        using step = forward_step<decltype(specialize(X.as_const()).form())>;
        check_views<VX, VY>();
        static_assert(!std::is_const_v<typename VY::value_type>, "BatchNorm3d::forward: Y must be writable");
        check_io(detail::operand_of(X, "input"), {detail::operand_of(Y, "output")});
        const auto sz = X.sizes();
        const bool batch_stats = training_ || !track_;
        if (batch_stats) check_batch_size(sz);
        const index_t C = sz[1];
        if (X.shape().numel() == 0) {
            if (affine_ && C_ == 0)
                throw error("select(): index 0 out of range for tensor of size [0] at dimension 0");
            if (training_ && track_) ++nbt_;
            remember(X.data(), Y.data(), sz, VX::layout_name(), batch_stats, epilogue);
            return std::optional<step>{};
        }
        check_channels(C);
        reserve(C);
        const typename step::form_type f = specialize(X.as_const()).form();
        double* work = workspace(f); // the one step that may allocate: before any state changes
        for (index_t c = 0; c < C; ++c) gamma_[c] = gamma_of(c);
        train_finalizer fin{this, f.count(), training_ && track_, T(0)};
        if (batch_stats && fin.update) {
            ++nbt_;
            fin.momentum = static_cast<T>(momentum_ ? *momentum_ : 1.0 / static_cast<double>(nbt_));
        }
        if (!batch_stats)
            for (index_t c = 0; c < C; ++c) {
                mean_[c] = running_mean_[c];
                mean_lo_[c] = T(0);
                alpha_[c] = nn::rules::scale(nn::rules::eval_invstd(running_var_[c], eps_), gamma_[c]);
                beta_[c] = bias_of(c);
                invstd_[c] = nn::rules::eval_backward_invstd(running_var_[c], eps_);
            }
        remember(X.data(), Y.data(), sz, VX::layout_name(), batch_stats, epilogue);
        return std::optional<step>{step{f, batch_stats, policy_, moments(), coeffs(), work, fin}};
    }

    /// A copied owner (the fused block) moves the record of the last forward's input from its
    /// original's buffer to its own.
    void rebind_input(const void* from, const void* to) noexcept
    {
        if (saved_.x == from && from != nullptr) saved_.x = to;
    }

    /// Runtime-shaped C: the kernels gen/ generated for this channel count and layout, if the
    /// registry has them (null otherwise, and always with a static C: those are specialized
    /// already).  kernel_choice() then says which ran and why.
    template <class L>
    const registry::bn_kernels<L>* registered_kernels(bool relu)
    {
        // gen/ emits float32 kernels: double always runs the compile-time templates.
        if constexpr (StaticC != dynamic || !std::is_same_v<T, float> ||
                      !(std::is_same_v<L, ncdhw_t> || std::is_same_v<L, ndhwc_t>)) {
            (void)relu;
            return nullptr;
        } else {
            const std::uint64_t g = registry::generation();
            if (const registry::entry* e = adopted_.entry; e && adopted_.generation == g) {
                const registry::bn_kernels<L>& k = kernels_of<L>(*e);
                if (k.normalize) {
                    if (choice_.found != e || resolved_layout_ != "block") {
                        choice_ = block_choice(*e);
                        resolved_layout_ = "block"; // the next standalone call resolves again
                    }
                    return &k;
                }
            }
            // Resolved once per (layout, epilogue) and kept until the registry changes.
            if (resolved_generation_ != g || resolved_layout_ != L::name || resolved_relu_ != relu) {
                choice_ = registry::global().lookup(registry_key<L>(relu));
                resolved_generation_ = g;
                resolved_layout_ = L::name;
                resolved_relu_ = relu;
            }
            return choice_.found ? &kernels_of<L>(*choice_.found) : nullptr;
        }
    }
    static registry::choice block_choice(const registry::entry& e)
    {
        return {nullptr, true, "specialized: generated with its block, " + e.origin, &e};
    }
    template <class L>
    static const registry::bn_kernels<L>& kernels_of(const registry::entry& e) noexcept
    {
        if constexpr (std::is_same_v<L, ncdhw_t>) return e.bn_ncdhw;
        else return e.bn_ndhwc;
    }
    /// The fused block's BN: the registry entry its conv resolved carries the BN kernels gen
    /// emitted with the block (bn_ncdhw/bn_ndhwc), which this module then runs in forward and
    /// backward instead of looking up a standalone BatchNorm3d of its channel count.  No entry
    /// (the conv fell back): the standalone lookup, as for any BatchNorm3d.
    void adopt_kernels(const registry::choice& block) noexcept
    {
        adopted_.entry = block.found;
        adopted_.generation = registry::generation();
    }
    /// Inference in the block: folded into the conv's weights, no BN kernel runs.
    void folded_into(const registry::choice& block)
    {
        if constexpr (StaticC == dynamic) // a static C's choice stays "specialized: compile-time"
            if (choice_.found != block.found || resolved_layout_ != "folded") {
                choice_ = {nullptr, block.specialized,
                           "folded into the conv's weights and bias (inference); the conv: " + block.why, block.found};
                resolved_layout_ = "folded"; // the next standalone call resolves again
            }
    }

    struct io_arg {
        const void* data;
        std::array<index_t, 5> sizes;
        const char* name;
    };
    struct saved_t {
        bool valid = false;
        bool in_place = false;
        bool batch_stats = true;
        const void* x = nullptr;
        std::array<index_t, 5> sizes{};
        std::string_view layout;
        std::string_view epilogue; // the name of the epilogue forward applied (a static string)
        kernels::batch_stats_policy policy = kernels::batch_stats_policy::fast;
    };

    template <class VA, class VB>
    static constexpr void check_views()
    {
        static_assert(is_view_v<VA> && is_view_v<VB>, "BatchNorm3d: arguments must be volfuse views (vf::ncdhw_view, ...)");
        static_assert(std::is_same_v<typename VA::layout_type, typename VB::layout_type>,
                      "BatchNorm3d: all tensors of one call must have the same layout");
        static_assert(std::is_same_v<std::remove_const_t<typename VA::value_type>, T> &&
                          std::is_same_v<std::remove_const_t<typename VB::value_type>, T>,
                      "BatchNorm3d<C, T>: tensors must have the module's element type T");
        if constexpr (StaticC != dynamic) {
            constexpr index_t vc = VA::shape_type::static_sizes[1];
            static_assert(vc == dynamic || vc == StaticC, "BatchNorm3d<C>: the view's static C differs from C");
        }
    }

    /// Shapes equal (the operands are checked: sizes valid, data not null), outputs either
    /// exactly the input or disjoint from it.
    static void check_io(const detail::operand& x, std::initializer_list<detail::operand> others)
    {
        for (const detail::operand& a : others) {
            if (a.sizes != x.sizes)
                throw error(std::string(a.name) + " has shape " + detail::sizes_str(a.sizes) + " but " +
                            std::string(x.name) + " has shape " + detail::sizes_str(x.sizes));
            detail::check_disjoint(a, x, /*same memory allowed*/ true);
        }
    }

    static void check_batch_size(const std::array<index_t, 5>& sz)
    {
        // N*D*H*W (C may be 0, so this product may not fit even when numel does).
        index_t values = 1;
        bool overflow = false;
        for (int d : {0, 2, 3, 4}) overflow |= __builtin_mul_overflow(values, sz[d], &values);
        if (!overflow && values == 1)
            throw error("Expected more than 1 value per channel when training, got input size " +
                        detail::sizes_str(sz));
    }

    /// ATen's check_dims_match_num_input_features, in its order.
    void check_channels(index_t C) const
    {
        auto msg = [&](const char* name) {
            return std::string(name) + " should contain " + std::to_string(C) + " elements not " + std::to_string(C_);
        };
        if (track_ && C != C_) throw error(msg("running_mean"));
        if (affine_ && C != C_) throw error(msg("weight"));
        if (StaticC != dynamic && C != StaticC)
            throw error("BatchNorm3d<" + std::to_string(StaticC) + ">: kernels are specialized for " +
                        std::to_string(StaticC) + " channels, got input with " + std::to_string(C) + " channels");
    }

    /// Per-channel scratch for C channels (allocates only when C grows: a module
    /// without affine or running statistics accepts any C, as PyTorch's does).
    void reserve(index_t C)
    {
        if (static_cast<index_t>(mean_.size()) >= C && !mean_.empty()) return;
        const auto c = static_cast<std::size_t>(std::max<index_t>(C, 1));
        for (auto* v : {&mean_, &mean_lo_, &alpha_, &beta_, &invstd_, &gamma_, &grad_mean_, &k_, &shift_}) v->resize(c);
        stat_mean_.resize(c);
        stat_m2_.resize(c);
    }

    template <class V>
    static auto specialize(const V& v) noexcept
    {
        if constexpr (StaticC != dynamic) return v.with_channels(fix<StaticC>);
        else return v;
    }

    void remember(const void* x, const void* y, const std::array<index_t, 5>& sz, std::string_view layout,
                  bool batch_stats, std::string_view epilogue) noexcept
    {
        const bool empty = sz[0] * sz[1] * sz[2] * sz[3] * sz[4] == 0;
        saved_ = {true, x == y && !empty, batch_stats, x, sz, layout, epilogue, policy_};
    }

    kernels::bn_coeffs_out<T> coeffs() noexcept { return {mean_.data(), mean_lo_.data(), alpha_.data(), beta_.data()}; }
    kernels::moments_out<T> moments() noexcept { return {shift_.data(), stat_mean_.data(), stat_m2_.data()}; }

    T gamma_of(index_t c) const noexcept { return affine_ ? weight_[c] : T(1); }
    T bias_of(index_t c) const noexcept { return affine_ ? bias_[c] : T(0); }

    /// Kernel workspace for a form (grows, never shrinks: no allocation once warm).
    template <class Form>
    double* workspace(const Form& f)
    {
        const auto need = static_cast<std::size_t>(kernels::reduce_workspace(f, 2));
        if (work_.size() < need) work_.resize(need);
        return work_.data();
    }

    template <class V, class Epi>
    void run_backward(const V& X, const T* dy, T* dx, Epi epi)
    {
        const auto f = X.form();
        double* work = workspace(f);
        const index_t n = f.count();
        const kernels::bn_backward_coeffs<T> cf{coeffs(), invstd_.data(), gamma_.data(), grad_mean_.data(), k_.data()};
        auto accumulate = [&](index_t c, double sum, double dotp, T invstd) {
            if (!affine_) return;
            bias_grad_[c] += static_cast<T>(sum);
            weight_grad_[c] += static_cast<T>(dotp * static_cast<double>(invstd));
        };
        auto batch_finalize = [&](index_t c, double sum, double dotp) {
            const T invstd = invstd_[c];
            accumulate(c, sum, dotp, invstd);
            grad_mean_[c] = static_cast<T>(sum / static_cast<double>(n));
            k_[c] = nn::rules::rounded(nn::rules::rounded(static_cast<T>(dotp) * invstd) * invstd) / static_cast<T>(n);
        };
        auto running_finalize = [&](index_t c, double sum, double dotp) { accumulate(c, sum, dotp, invstd_[c]); };
        using L = typename V::layout_type;
        if constexpr ((std::is_same_v<Epi, expr::relu_t> || std::is_same_v<Epi, expr::identity_t>) &&
                      StaticC == dynamic && std::is_same_v<T, float> && std::is_same_v<std::remove_cv_t<decltype(f)>, registry::dynamic_form<L>>) {
            if (const auto* k = registered_kernels<L>(std::is_same_v<Epi, expr::relu_t>)) {
                if (saved_.batch_stats)
                    k->backward(f, true, saved_.policy, X.data(), dy, dx, cf, work,
                                registry::backward_finalize::of(batch_finalize), std::is_same_v<Epi, expr::relu_t>);
                else
                    k->backward(f, false, saved_.policy, X.data(), dy, dx, cf, work,
                                registry::backward_finalize::of(running_finalize), std::is_same_v<Epi, expr::relu_t>);
                return;
            }
        }
        if (saved_.batch_stats)
            kernels::batch_norm_backward<true>(f, saved_.policy, X.data(), dy, dx, cf, work, batch_finalize, epi);
        else kernels::batch_norm_backward<false>(f, saved_.policy, X.data(), dy, dx, cf, work, running_finalize, epi);
    }

    index_t C_;
    double eps_;
    std::optional<double> momentum_;
    bool affine_;
    bool track_;
    bool training_ = true;
    std::int64_t nbt_ = 0;

    std::vector<T> weight_, bias_, running_mean_, running_var_, weight_grad_, bias_grad_;
    // Saved by forward for backward (per channel): statistics, coefficients, weight.
    std::vector<T> mean_, mean_lo_, alpha_, beta_, invstd_, gamma_;
    // The statistics phase's output (per channel): shift scratch, mean, M2 / var_sum.
    std::vector<T> shift_;
    std::vector<double> stat_mean_, stat_m2_;
    kernels::batch_stats_policy policy_ = kernels::batch_stats_policy::fast;
    // Backward scratch.
    std::vector<T> grad_mean_, k_;
    std::vector<double> work_;
    saved_t saved_;
    template <class L>
    registry::key registry_key(bool relu) const
    {
        return {relu ? registry::op::bn_relu : registry::op::batch_norm, C_, C_, 1, 1, 0, 1, std::string(L::name)};
    }
    registry::choice choice_{nullptr, StaticC != dynamic,
                             StaticC != dynamic ? "specialized: compile-time channel count"
                             : !std::is_same_v<T, float>
                                 ? "runtime-shaped: the kernel templates for this element type (gen/ emits float32 kernels)"
                                 : "no call yet: kernel_choice(vf::ncdhw) or kernel_choice(vf::ndhwc) "
                                   "says what a call would run"};
    std::uint64_t resolved_generation_ = 0; // choice_ is valid for this registry generation, layout, epilogue
    std::string_view resolved_layout_;
    bool resolved_relu_ = false;
    /// The fused block's entry (adopt_kernels).  A copy is a module of its own and looks its
    /// kernels up itself (its owner's next forward adopts again); a move keeps it.
    struct adopted_entry {
        const registry::entry* entry = nullptr;
        std::uint64_t generation = 0;
        adopted_entry() = default;
        adopted_entry(const adopted_entry&) noexcept {}
        adopted_entry(adopted_entry&&) noexcept = default;
        adopted_entry& operator=(const adopted_entry& o) noexcept
        {
            if (this != &o) *this = adopted_entry();
            return *this;
        }
        adopted_entry& operator=(adopted_entry&&) noexcept = default;
    };
    adopted_entry adopted_;
};

namespace detail {
/// What BatchNorm3d's backward needs from its forward, moved out of a module and into another
/// by a caller that keeps it between the calls (the PyTorch ops keep it in a tensor, as cuDNN
/// keeps its reserve space): `rows` arrays of C values, mean (hi), mean_lo, alpha, beta,
/// invstd, gamma.
struct saved_forward {
    static constexpr index_t rows = 6;
    /// The last forward's arrays into out (rows * C values).
    template <class BN>
    static void save(const BN& bn, std::span<typename BN::value_type> out, index_t C) noexcept
    {
        const decltype(bn.mean_)* from[rows] = {&bn.mean_, &bn.mean_lo_, &bn.alpha_, &bn.beta_, &bn.invstd_, &bn.gamma_};
        for (index_t r = 0; r < rows; ++r)
            std::copy_n(from[r]->data(), C, out.data() + r * C);
    }
    /// Makes `bn`'s next backward(X, ...) that of a forward on X which left `in` (from save()),
    /// normalized with batch statistics or not, through the epilogue named `epilogue` (a
    /// static string: Epi::name).  in must hold rows * C values, C = X's channels.
    template <class BN, class VX>
    static void restore(BN& bn, const VX& X, std::span<const typename BN::value_type> in, bool batch_stats,
                        std::string_view epilogue)
    {
        const index_t C = X.sizes()[1];
        if (static_cast<index_t>(in.size()) != rows * C)
            throw error("saved forward state has " + std::to_string(in.size()) + " values, expected " +
                        std::to_string(rows * C) + " for " + std::to_string(C) + " channels");
        bn.reserve(C);
        decltype(bn.mean_)* to[rows] = {&bn.mean_, &bn.mean_lo_, &bn.alpha_, &bn.beta_, &bn.invstd_, &bn.gamma_};
        for (index_t r = 0; r < rows; ++r) std::copy_n(in.data() + r * C, C, to[r]->data());
        bn.saved_ = {true, false, batch_stats, X.data(), X.sizes(), VX::layout_name(), epilogue, bn.policy_};
    }
    /// The same for a SyncBatchNorm3d's synchronized training forward over `global_count`
    /// values per channel (its backward_message/backward_merged run next).
    template <class SBN>
    static void save_sync(const SBN& s, std::span<typename SBN::value_type> out, index_t C) noexcept
    {
        save(s.bn_, out, C);
    }
    template <class SBN, class VX>
    static void restore_sync(SBN& s, const VX& X, std::span<const typename SBN::value_type> in,
                             std::int64_t global_count, std::string_view epilogue)
    {
        if (global_count < 0) throw error("saved forward state: negative global count " + std::to_string(global_count));
        restore(s.bn_, X, in, true, epilogue);
        s.synced_ = true;
        s.global_count_ = global_count;
    }
};
} // namespace detail


} // namespace volfuse
