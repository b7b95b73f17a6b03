// volfuse::ConvBnReLU3d: Conv3d -> BatchNorm3d -> ReLU as one fused layer (the name
// torch.ao.nn.intrinsic gives the block).  The parts are the standalone modules, moved
// in and reachable; forward is vf::evaluate(Y, vf::relu(bn(conv(X)))) (expr/evaluate.hpp:
// statistics in the conv's epilogue when training, BN folded into the conv for inference);
// backward runs ReLU -> BN -> Conv3d by hand, as autograd would on the unfused chain.
#pragma once

#include "../core/config.hpp"

#include <span>
#include <string>
#include <utility>

#include "../core/checks.hpp"
#include "../core/error.hpp"
#include "../expr/evaluate.hpp"
#include "batchnorm3d.hpp"
#include "conv3d.hpp"
#include "sync_batchnorm3d.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

/// @tparam Norm  the normalization part: BatchNorm3d<StaticC, T> (the default: float) or
///               SyncBatchNorm3d<StaticC, T> (statistics over a communicator's processes); its
///               element type T is the block's (the conv is Conv3d<Spec, T>).
template <conv_spec Spec = conv_spec{}, index_t StaticC = dynamic, class Norm = BatchNorm3d<StaticC>>
class ConvBnReLU3d {
    using T = typename Norm::value_type;
    static_assert(std::is_same_v<Norm, BatchNorm3d<StaticC, T>> || std::is_same_v<Norm, SyncBatchNorm3d<StaticC, T>>,
                  "ConvBnReLU3d: the normalization is BatchNorm3d<C> or SyncBatchNorm3d<C>");
    static constexpr bool sync = std::is_same_v<Norm, SyncBatchNorm3d<StaticC, T>>;

public:
    using value_type = T;
    using conv_type = Conv3d<Spec, T>;
    using bn_type = Norm;

    ConvBnReLU3d(conv_type conv, bn_type bn) : conv_(std::move(conv)), bn_(std::move(bn))
    {
        conv_.set_registry_op(registry::op::conv_bn_relu); // runtime-shaped: found as the block's layer
        if (bn_.num_features() != conv_.out_channels())
            throw error("ConvBnReLU3d: BatchNorm3d has " + std::to_string(bn_.num_features()) +
                        " features but the Conv3d has " + std::to_string(conv_.out_channels()) + " output channels");
    }

    /// `ConvBnReLU3d<spec, C>{}` when the spec fixes the conv (as Conv3d<spec>{}) and C is
    /// static: the types volfuse_gen names (`conv1_t`), with PyTorch's BatchNorm3d defaults.
    ConvBnReLU3d()
        requires(StaticC != dynamic && std::is_default_constructible_v<conv_type> && !sync)
        : ConvBnReLU3d(conv_type{}, bn_type(StaticC))
    {
    }

    /// A copy is a module of its own: its BatchNorm3d's record of the last forward's input (the
    /// conv output the block keeps) points at the copy's kept output, so backward works on it.
    ConvBnReLU3d(const ConvBnReLU3d& o) : conv_(o.conv_), bn_(o.bn_), last_(o.last_), dz_(o.dz_), dy_(o.dy_)
    {
        bn_.rebind_input(o.conv_.kept_data(), conv_.kept_data());
    }
    ConvBnReLU3d& operator=(const ConvBnReLU3d& o)
    {
        if (this != &o) *this = ConvBnReLU3d(o);
        return *this;
    }
    ConvBnReLU3d(ConvBnReLU3d&&) noexcept = default; // vectors move their memory: the record stays right
    ConvBnReLU3d& operator=(ConvBnReLU3d&&) noexcept = default;

    conv_type& conv() noexcept { return conv_; }
    const conv_type& conv() const noexcept { return conv_; }
    bn_type& bn() noexcept { return bn_; }
    /// The conv's then the BatchNorm3d's, named as in torch.ao.nn.intrinsic.ConvBnReLU3d's
    /// state_dict ("0.weight", "0.bias", "1.weight", "1.bias").
    std::vector<parameter> parameters()
    {
        std::vector<parameter> p;
        append_parameters(p, "0.", conv_.parameters());
        append_parameters(p, "1.", bn_.parameters());
        return p;
    }
    const bn_type& bn() const noexcept { return bn_; }

    /// PyTorch's: the mode is the BatchNorm3d's (the conv has none).
    void train(bool mode = true) noexcept { bn_.train(mode); }
    void eval() noexcept { bn_.eval(); }
    bool training() const noexcept { return bn_.training(); }

    /// torch.ao.nn.intrinsic.ConvBnReLU3d's repr.
    std::string repr() const
    {
        return "ConvBnReLU3d(\n  (0): " + conv_.repr() + "\n  (1): " + bn_.repr() + "\n  (2): ReLU()\n)";
    }

    std::array<index_t, 5> output_sizes(const std::array<index_t, 5>& in) const noexcept
    {
        return conv_.output_sizes(in);
    }

    /// Y = relu(bn(conv(X))).  Y has output_sizes(X.sizes()) and does not overlap X.
    template <class VX, class VY>
    void forward(const VX& X, const VY& Y)
    {
        run_forward(X, Y, nullptr, 0);
    }
    /// The same, with the conv output z that batch statistics keep for backward written to Z
    /// (NDHWC, output_sizes(X.sizes()), disjoint from X and Y) instead of the module's own
    /// buffer: for callers that hand z on, as PyTorch's fused operators return what their
    /// backward saves, without a copy.  backward then reads z from Z: keep it alive and
    /// unchanged until backward has run.  With running statistics nothing is kept and Z is not
    /// written.  Not for a SyncBatchNorm3d block: its checks would have to join the BN's
    /// collective agreement (a process throwing alone would leave the others waiting).
    template <class VX, class VY, class VZ>
        requires(!sync)
    void forward(const VX& X, const VY& Y, const VZ& Z)
    {
        static_assert(is_view_v<VZ> && std::is_same_v<typename VZ::layout_type, ndhwc_t> &&
                          std::is_same_v<typename VZ::value_type, T>,
                      "ConvBnReLU3d::forward: Z must be a writable NDHWC view of the block's element type");
        // X's own errors first, as forward(X, Y) reports them; then Z against X's output sizes.
        const auto x = detail::operand_of(X, "input");
        conv_.check_input(x);
        const auto z = detail::operand_of(Z, "conv_output");
        detail::check_sizes(z, output_sizes(x.sizes), "ConvBnReLU3d", x.sizes);
        detail::check_disjoint(z, x);
        detail::check_disjoint(z, detail::operand_of(Y, "output"));
        run_forward(X, Y, Z.data(), z.numel);
    }

    /// Gradients through ReLU, BatchNorm3d and Conv3d for dY: writes dX, accumulates the
    /// conv's and the BN's weight and bias grads.  After a batch-statistics forward, X must be
    /// that forward's input (its conv output was kept); with running statistics, the conv
    /// output is recomputed from X.  Every argument is checked before anything is written.
    template <class VX, class VDY, class VDX>
    void backward(const VX& X, const VDY& dY, const VDX& dX)
    {
        static_assert(!std::is_const_v<typename VDX::value_type>, "ConvBnReLU3d::backward: dX must be writable");
        run_backward(X, dY, &dX);
    }
    /// The same without the input's gradient: for a network's first layer, whose input needs
    /// none (autograd skips it, and so does this: no grad-input convolution runs).
    template <class VX, class VDY>
    void backward(const VX& X, const VDY& dY)
    {
        run_backward(X, dY, static_cast<const no_grad_input*>(nullptr));
    }

    /// The conv output z the last batch-statistics forward kept for backward: NDHWC, of sizes
    /// output_sizes(X.sizes()), empty before any.  For callers that run the backward's parts
    /// themselves (volfuse's PyTorch operators hand it to autograd as the BN's input).
    std::span<const T> conv_output() const noexcept { return {conv_.kept_data(), conv_.kept_size()}; }

private:
    /// forward keeping a batch-statistics conv output at z (the caller's) or, for nullptr, in
    /// the module's buffer; with running statistics nothing is kept and the record of the last
    /// kept z stays.  A forward that throws changed nothing, where z is kept included.
    template <class VX, class VY>
    void run_forward(const VX& X, const VY& Y, T* z, index_t n)
    {
        const bool batch_stats = bn_.training() || !bn_.track_running_stats();
        T* const before = conv_.kept_at_;
        const index_t before_n = conv_.kept_at_n_;
        if (batch_stats) conv_.keep_output_in(z, n);
        try {
            evaluate(Y, relu(bn_(conv_(X))));
        } catch (...) {
            conv_.keep_output_in(before, before_n);
            throw;
        }
        last_ = {batch_stats, X.data(), X.sizes(), conv_.input_copy_stamp()};
    }

    // NCDHW (or any non-NDHWC layout) pays one reorder each way: dY in, dX out; X is the
    // forward's own NDHWC copy when the conv still holds it, and dz stays NDHWC throughout.
    struct no_grad_input {};

    template <class VX, class VDY, class VDX>
    void run_backward(const VX& X, const VDY& dY, const VDX* dX)
    {
        constexpr bool want_dx = !std::is_same_v<VDX, no_grad_input>;
        using L = typename VX::layout_type;
        static_assert(std::is_same_v<L, typename VDY::layout_type>,
                      "ConvBnReLU3d: all tensors of one call must have the same layout");
        if constexpr (want_dx)
            static_assert(std::is_same_v<L, typename VDX::layout_type>,
                          "ConvBnReLU3d: all tensors of one call must have the same layout");
        constexpr bool direct = std::is_same_v<L, ndhwc_t>;
        // Every check first (each operand's sizes, data and overlaps, the conv's channels and
        // shapes, the pairing with forward); only then are sizes derived and anything touched.
        std::array<index_t, 5> osz{};
        index_t n = 0;
        T* z = nullptr;
        T* dx = nullptr;
        const T* x = nullptr;
        const T* dy = nullptr;
        const bool empty = X.shape().numel() == 0;
        auto prepare = [&] {
            const auto dy_arg = detail::operand_of(dY, "grad_output");
            if constexpr (want_dx) conv_.check_backward(X, dy_arg, dX, "ConvBnReLU3d");
            else conv_.check_backward(X, dy_arg, static_cast<const VX*>(nullptr), "ConvBnReLU3d");
            osz = output_sizes(X.sizes());
            const bool batch_stats = bn_.training() || !bn_.track_running_stats();
            if (batch_stats && !(last_.batch_stats && last_.x == X.data() && last_.sizes == X.sizes()))
                throw error("ConvBnReLU3d::backward: X is not the input of the last training forward "
                            "(run forward(X, Y) in training mode first)");
            n = 1;
            for (index_t v : osz) n *= v;
            // Then every allocation.
            dz_.resize(static_cast<std::size_t>(n));
            if constexpr (!direct) dy_.resize(static_cast<std::size_t>(n));
            conv_.template reserve_backward<L>(X.sizes());
            // The batch-statistics forward's conv output, kept; else scratch for its recompute
            // (never the caller's memory a batch-statistics forward kept z in).
            z = batch_stats ? conv_.kept_output(n) : conv_.kept_buffer(n);
            if constexpr (want_dx) dx = conv_.grad_input_for(*dX);
            if (!batch_stats) {
                // Running statistics: recompute the conv output (unfolded) and let the BN
                // record it as its input; nothing else changes in eval (no communication).
                x = conv_.prepare_forward(X, detail::operand{z, n, n, osz, "output"});
                if (n > 0) conv_.template run_forward<L>(X.sizes(), x, z, false);
                bn_.forward(ndhwc_view(static_cast<const T*>(z), osz), ndhwc_view(dz_.data(), osz), relu);
            } else if (!empty) {
                x = conv_.is_channels_last(X) || conv_.input_copy_stamp() != last_.x_stamp ? conv_.input_of(X)
                                                                                             : conv_.input_copy();
            }
            dy = dY.data();
            if constexpr (!direct) {
                if (n > 0) reorder(dY, ndhwc_view(dy_.data(), osz));
                dy = dy_.data();
            }
        };
        if constexpr (sync) {
            // A SyncBatchNorm3d's backward is collective: this process's own checks become its
            // outcome in the BN's agreement round, so an error anywhere is an error everywhere.
            std::string failed;
            try {
                prepare();
            } catch (const std::exception& e) {
                failed = e.what();
                if (failed.empty()) failed = "ConvBnReLU3d::backward failed";
            }
            bn_.backward_agreed(ndhwc_view(static_cast<const T*>(z), osz), ndhwc_view(dy, osz),
                                ndhwc_view(dz_.data(), osz), relu, failed);
        } else {
            prepare();
            bn_.backward(ndhwc_view(static_cast<const T*>(z), osz), ndhwc_view(dy, osz),
                         ndhwc_view(dz_.data(), osz), relu);
        }
        conv_.template backward_channels_last<L>(X.sizes(), x, dz_.data(), dx);
        if constexpr (want_dx && !direct)
            if (!empty && dx != dX->data()) reorder(ndhwc_view(static_cast<const T*>(dx), X.sizes()), *dX);
    }

    struct last_forward {
        bool batch_stats = false;
        const void* x = nullptr;
        std::array<index_t, 5> sizes{};
        std::uint64_t x_stamp = 0; // the conv's NDHWC copy of X as this forward left it
    };
    conv_type conv_;
    bn_type bn_;
    last_forward last_;
    std::vector<T> dz_, dy_; // workspaces: dL/dz, and dY or dz in the caller's layout
};

template <conv_spec S, index_t C, class T>
ConvBnReLU3d(Conv3d<S, T>, BatchNorm3d<C, T>) -> ConvBnReLU3d<S, C, BatchNorm3d<C, T>>;
template <conv_spec S, index_t C, class T>
ConvBnReLU3d(Conv3d<S, T>, SyncBatchNorm3d<C, T>) -> ConvBnReLU3d<S, C, SyncBatchNorm3d<C, T>>;

} // namespace volfuse
