// volfuse::SyncBatchNorm3d: torch.nn.SyncBatchNorm's semantics on CPUs, over any
// vf::communicator (MPI: <volfuse/dist/mpi.hpp>).  In training, every process passes its part
// of the global batch and gets BatchNorm3d of the concatenated global batch, restricted to its
// part; running statistics are updated identically everywhere.  It composes BatchNorm3d's
// phases with two all-gathers per call:
//   forward:  validate locally -> agree (header all-gather: errors, C, counts) -> local
//             moments -> all-gather -> Chan merge in rank order -> finalize -> normalize;
//   backward: validate locally -> agree -> local sums -> all-gather -> add in rank order ->
//             finalize -> elementwise dx (weight/bias grads: this process's contribution).
// Every process computes the merge itself from the same gathered bytes in the same order, so
// statistics are identical on all of them and independent of how the transport orders a
// reduction.  Eval mode communicates nothing (BatchNorm3d's eval).
#pragma once

#include "../core/config.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "../dist/communicator.hpp"
#include "batchnorm3d.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

/// Batch normalization with statistics over the processes of a communicator.
/// @tparam StaticC  channel count fixed at compile time, or `dynamic` (the default).
/// @tparam T        element type: float (the default) or double.
template <index_t StaticC = dynamic, class T = float>
class SyncBatchNorm3d {
public:
    using value_type = T;
    static constexpr index_t static_channels = StaticC;
    static constexpr bool is_sync = true;

    /// As torch.nn.SyncBatchNorm(num_features, eps, momentum, affine, track_running_stats,
    /// process_group): `comm` is the process group (it must outlive the module).
    SyncBatchNorm3d(index_t num_features, communicator_ref comm, double eps = 1e-5,
                    std::optional<double> momentum = 0.1, bool affine = true, bool track_running_stats = true)
        : bn_(num_features, eps, momentum, affine, track_running_stats), comm_(comm)
    {
    }

    /// torch.nn.SyncBatchNorm.convert_sync_batchnorm for one module: parameters, buffers,
    /// num_batches_tracked, mode and statistics policy copied from `bn`.
    static SyncBatchNorm3d from(const BatchNorm3d<StaticC, T>& bn, communicator_ref comm)
    {
        return SyncBatchNorm3d(bn, comm);
    }

    // --- everything BatchNorm3d has, with the same meaning ------------------------------
    void train(bool mode = true) noexcept { bn_.train(mode); }
    void eval() noexcept { bn_.eval(); }
    bool training() const noexcept { return bn_.training(); }
    index_t num_features() const noexcept { return bn_.num_features(); }
    double eps() const noexcept { return bn_.eps(); }
    std::optional<double> momentum() const noexcept { return bn_.momentum(); }
    bool affine() const noexcept { return bn_.affine(); }
    bool track_running_stats() const noexcept { return bn_.track_running_stats(); }
    /// `SyncBatchNorm(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)`.
    std::string repr() const { return "SyncBatchNorm" + bn_.repr().substr(std::string("BatchNorm3d").size()); }

    std::span<T> weight() noexcept { return bn_.weight(); }
    std::span<T> bias() noexcept { return bn_.bias(); }
    std::span<T> running_mean() noexcept { return bn_.running_mean(); }
    std::span<T> running_var() noexcept { return bn_.running_var(); }
    std::span<const T> weight() const noexcept { return bn_.weight(); }
    std::span<const T> bias() const noexcept { return bn_.bias(); }
    std::span<const T> running_mean() const noexcept { return bn_.running_mean(); }
    std::span<const T> running_var() const noexcept { return bn_.running_var(); }
    std::int64_t num_batches_tracked() const noexcept { return bn_.num_batches_tracked(); }
    void set_num_batches_tracked(std::int64_t v) noexcept { bn_.set_num_batches_tracked(v); }
    std::span<const T> weight_grad() const noexcept { return bn_.weight_grad(); }
    std::span<const T> bias_grad() const noexcept { return bn_.bias_grad(); }
    std::vector<basic_parameter<T>> parameters() { return bn_.parameters(); }
    void zero_grad() noexcept { bn_.zero_grad(); }
    void reset_running_stats() noexcept { bn_.reset_running_stats(); }
    void reset_parameters() noexcept { bn_.reset_parameters(); }
    /// Eval mode only: training statistics are always the mergeable moments (policy fast).
    void set_stats_policy(batch_stats_policy p) noexcept { bn_.set_stats_policy(p); }
    batch_stats_policy stats_policy() const noexcept { return bn_.stats_policy(); }
    /// The group this module synchronizes over.
    const communicator_ref& communicator() const noexcept { return comm_; }

    /// `bn(conv(X))`: batch norm of a convolution's output, for the fused block
    /// (ConvBnReLU3d with a SyncBatchNorm3d part): conv epilogue moments -> all-gather -> normalize.
    template <class M, class I>
    expr::batch_norm<SyncBatchNorm3d, expr::conv_output<M, I>> operator()(const expr::conv_output<M, I>& c) noexcept
    {
        return {this, c};
    }

    // --- compute --------------------------------------------------------------------

    /// Y = epi(SyncBatchNorm(X)); Y may be X itself.  Training: collective (every process of
    /// the group calls it, with its own part of the batch: any N, 0 included); an error on
    /// any process is thrown on all, and then no process has changed anything.
    template <class VX, class VY, expr::epilogue Epi = expr::identity_t>
    void forward(const VX& X, const VY& Y, Epi epi = {})
    {
        if (!bn_.training()) { // PyTorch: eval mode does not synchronize
            synced_ = false;
            bn_.forward(X, Y, epi);
            return;
        }
        const auto sz = X.sizes();
        const index_t C = sz[1];
        header h = try_local([&] { check_forward(X, Y); });
        h.count = values_per_channel(sz);
        agree(h, sz); // throws on every process if any failed

        // Committed from here on: kernels and all-gathers do not fail.
        local_moments(X);
        exchange(message_of_moments(C, h.count, X.shape().numel() > 0));
        commit_forward(C, sz, X.data(), Y.data(), VX::layout_name(), Epi::name);
        if (X.shape().numel() > 0)
            kernels::normalize(bn_type::specialize(X.as_const()).form(), 0, C, X.data(), Y.data(), bn_.coeffs(), epi);
    }

    /// Backward of the last forward: collective after a training forward (every process
    /// calls it), local after an eval-mode one.  dX is this process's slice of the global
    /// grad input; weight_grad()/bias_grad() accumulate this process's contribution (sum them
    /// across processes for the global batch's, as DDP does).
    template <class VX, class VDY, class VDX, expr::epilogue Epi = expr::identity_t>
    void backward(const VX& X, const VDY& dY, const VDX& dX, Epi epi = {})
    {
        backward_agreed(X, dY, dX, epi, {});
    }

    // --- split phases ---------------------------------------------------------------
    // forward() and backward() with the all-gathers left to the caller, for a transport the
    // module cannot call (the PyTorch package's process groups are reached from Python):
    //   m = forward_message(X);  gather every process's m in rank order;  forward_merged(X, Y, all)
    //   m = backward_message(X, dY, dX);  gather;  backward_merged(X, dY, dX, all, rank)
    // The caller agrees on errors itself: if a *_message threw on any process, no process may
    // call the matching *_merged (the others would wait for it in the next gather).

    /// A training forward's local half: every check forward(X, ...) makes of X, then this
    /// process's message [values per channel, mean[0..C), M2[0..C)] (2C + 1 doubles).
    template <class VX>
    std::vector<double> forward_message(const VX& X)
    {
        if (!bn_.training())
            throw error("SyncBatchNorm3d::forward_message: the module is in eval mode, which communicates nothing "
                        "(call forward)");
        bn_type::template check_views<VX, VX>();
        const auto sz = X.sizes();
        bn_.check_io(detail::operand_of(X, "input"), {});
        bn_.check_channels(sz[1]);
        prepare_buffers(sz[1]);
        bn_.reserve(sz[1]);
        const std::int64_t count = values_per_channel(sz);
        if (count < 0) throw error("SyncBatchNorm3d: the global batch's values per channel overflow 64 bits");
        if (X.shape().numel() > 0) bn_.workspace(bn_type::specialize(X.as_const()).form());
        local_moments(X);
        const std::span<const double> m = message_of_moments(sz[1], count, X.shape().numel() > 0);
        return {m.begin(), m.end()};
    }

    /// The training forward's global half: Y = epi(SyncBatchNorm(X)) from `gathered`, every
    /// process's forward_message in rank order (processes * (2C + 1) doubles), X this
    /// process's part.  Validates all of it before anything is written.
    template <class VX, class VY, expr::epilogue Epi = expr::identity_t>
    void forward_merged(const VX& X, const VY& Y, std::span<const double> gathered, Epi epi = {})
    {
        if (!bn_.training())
            throw error("SyncBatchNorm3d::forward_merged: the module is in eval mode, which communicates nothing "
                        "(call forward)");
        check_forward(X, Y);
        const auto sz = X.sizes();
        const index_t C = sz[1];
        check_gathered(gathered, 2 * C + 1, "forward_merged");
        const std::size_t P = gathered.size() / static_cast<std::size_t>(2 * C + 1);
        std::int64_t n = 0;
        for (std::size_t r = 0; r < P; ++r) {
            const double v = gathered[r * static_cast<std::size_t>(2 * C + 1)];
            if (!(v >= 0 && v <= 0x1p53 && v == std::floor(v)))
                throw error("SyncBatchNorm3d::forward_merged: process " + std::to_string(r) +
                            "'s message has no valid count (not a forward_message?)");
            n += static_cast<std::int64_t>(v);
            if (n > (std::int64_t{1} << 53))
                throw error("SyncBatchNorm3d: the global batch's values per channel overflow 2^53");
        }
        if (n == 1)
            throw error("Expected more than 1 value per channel when training, got input size " + detail::sizes_str(sz));
        recv_.assign(gathered.begin(), gathered.end());
        commit_forward(C, sz, X.data(), Y.data(), VX::layout_name(), Epi::name, static_cast<int>(P));
        if (X.shape().numel() > 0)
            kernels::normalize(bn_type::specialize(X.as_const()).form(), 0, C, X.data(), Y.data(), bn_.coeffs(), epi);
    }

    /// The backward's local half, after a training forward (or forward_merged): every check
    /// backward makes, then this process's message [sum dY', sum dY' (X - mean)] (2C doubles,
    /// dY' = dY through the epilogue's derivative).
    template <class VX, class VDY, class VDX, expr::epilogue Epi = expr::identity_t>
    std::vector<double> backward_message(const VX& X, const VDY& dY, const VDX& dX, Epi epi = {})
    {
        check_synced_backward(X, dY, dX, epi, "backward_message");
        local_sums(X, dY, epi);
        return {send_.begin(), send_.begin() + 2 * X.sizes()[1]};
    }

    /// The backward's global half: dX (this process's slice) from `gathered`, every process's
    /// backward_message in rank order; `rank` is this process's place in it (its own sums are
    /// what weight_grad() and bias_grad() accumulate).
    template <class VX, class VDY, class VDX, expr::epilogue Epi = expr::identity_t>
    void backward_merged(const VX& X, const VDY& dY, const VDX& dX, std::span<const double> gathered, int rank,
                         Epi epi = {})
    {
        check_synced_backward(X, dY, dX, epi, "backward_merged");
        const index_t C = X.sizes()[1];
        if (C == 0) { // empty messages: nothing to merge, nothing to write
            if (!gathered.empty())
                throw error("SyncBatchNorm3d::backward_merged: gathered has " + std::to_string(gathered.size()) +
                            " values for 0 channels");
            return;
        }
        check_gathered(gathered, 2 * C, "backward_merged");
        const auto P = static_cast<int>(gathered.size() / static_cast<std::size_t>(2 * C));
        if (rank < 0 || rank >= P)
            throw error("SyncBatchNorm3d::backward_merged: rank " + std::to_string(rank) + " is not one of the " +
                        std::to_string(P) + " processes gathered");
        recv_.assign(gathered.begin(), gathered.end());
        apply_sums(X, dY, dX, P, rank, epi);
    }

private:
    template <conv_spec, index_t, class>
    friend class ConvBnReLU3d;
    friend struct detail::composer;
    friend struct detail::saved_forward; // moves what backward needs in and out (the PyTorch ops)

    /// backward, with an error the caller met before (its own checks: the fused block's) taken
    /// into the agreement as this process's outcome, so that all processes throw.
    template <class VX, class VDY, class VDX, class Epi>
    void backward_agreed(const VX& X, const VDY& dY, const VDX& dX, Epi epi, const std::string& prior_error)
    {
        if (!synced_) {
            if (!prior_error.empty()) throw error(prior_error);
            bn_.backward(X, dY, dX, epi);
            return;
        }
        const auto sz = X.sizes();
        const index_t C = sz[1];
        header h = try_local([&] {
            if (!prior_error.empty()) throw error(prior_error);
            bn_.check_backward(X, dY, dX, epi);
            prepare_buffers(C);
            if (X.shape().numel() > 0) bn_.workspace(bn_type::specialize(X.as_const()).form());
        });
        h.count = values_per_channel(sz);
        agree(h, sz);

        local_sums(X, dY, epi);
        exchange({send_.data(), 2 * static_cast<std::size_t>(C)});
        apply_sums(X, dY, dX, comm_.size(), comm_.rank(), epi);
    }

    /// backward_message/backward_merged's checks: backward's, after a synchronized forward.
    template <class VX, class VDY, class VDX, class Epi>
    void check_synced_backward(const VX& X, const VDY& dY, const VDX& dX, Epi epi, const char* what)
    {
        if (!synced_)
            throw error("SyncBatchNorm3d::" + std::string(what) +
                        ": the last forward was not a training forward over the group (call backward)");
        bn_.check_backward(X, dY, dX, epi);
        prepare_buffers(X.sizes()[1]);
        if (X.shape().numel() > 0) bn_.workspace(bn_type::specialize(X.as_const()).form());
    }

    /// gathered holds one message of `each` (> 0) doubles per process, at least one.
    static void check_gathered(std::span<const double> gathered, index_t each, const char* what)
    {
        const auto e = static_cast<std::size_t>(std::max<index_t>(each, 1));
        if (gathered.empty() || gathered.size() % e != 0)
            throw error("SyncBatchNorm3d::" + std::string(what) + ": gathered has " + std::to_string(gathered.size()) +
                        " values, not a positive multiple of the message size " + std::to_string(each));
    }

    /// The training forward's checks (forward(X, Y) makes these, on every process).
    template <class VX, class VY>
    void check_forward(const VX& X, const VY& Y)
    {
        bn_type::template check_views<VX, VY>();
        static_assert(!std::is_const_v<typename VY::value_type>, "SyncBatchNorm3d::forward: Y must be writable");
        const index_t C = X.sizes()[1];
        bn_.check_io(detail::operand_of(X, "input"), {detail::operand_of(Y, "output")});
        bn_.check_channels(C);
        prepare_buffers(C);
        bn_.reserve(C);
        if (X.shape().numel() > 0) bn_.workspace(bn_type::specialize(X.as_const()).form());
    }

    /// This process's moments (mean, M2) into bn_.moments().
    template <class VX>
    void local_moments(const VX& X) noexcept
    {
        if (X.shape().numel() == 0) return;
        const auto f = bn_type::specialize(X.as_const()).form();
        const kernels::moments_out<T> m = bn_.moments();
        kernels::for_channel_groups(f, [&](index_t c0, index_t c1) {
            kernels::moments(f, c0, c1, X.data(), bn_.work_.data(), m);
        });
    }

    /// The forward message from bn_.moments() (zeros when this process has no values).
    std::span<const double> message_of_moments(index_t C, std::int64_t count, bool local) noexcept
    {
        const kernels::moments_out<T> m = bn_.moments();
        send_[0] = static_cast<double>(count);
        for (index_t c = 0; c < C; ++c) {
            send_[static_cast<std::size_t>(1 + c)] = local ? m.mean[c] : 0.0;
            send_[static_cast<std::size_t>(1 + C + c)] = local ? m.m2[c] : 0.0;
        }
        return {send_.data(), static_cast<std::size_t>(2 * C + 1)};
    }

    /// comm's all-gather of one message per process into recv_.
    void exchange(std::span<const double> message) noexcept
    {
        comm_.all_gather(message.data(), recv_.data(), sizeof(double) * message.size());
    }

    /// This process's backward sums [sum dY', sum dY' (X - mean)] into send_ (zeros when empty).
    template <class VX, class VDY, class Epi>
    void local_sums(const VX& X, const VDY& dY, Epi epi) noexcept
    {
        const index_t C = X.sizes()[1];
        if (X.shape().numel() == 0) {
            std::fill(send_.begin(), send_.begin() + 2 * C, 0.0);
            return;
        }
        const auto f = bn_type::specialize(X.as_const()).form();
        double* work = bn_.work_.data();
        kernels::for_channel_groups(f, [&](index_t c0, index_t c1) {
            kernels::backward_sums(f, kernels::batch_stats_policy::fast, c0, c1, X.data(), dY.data(), bn_.coeffs(),
                                   work, epi);
        });
        const index_t stride = kernels::reduce_stride(C);
        for (index_t c = 0; c < C; ++c) send_[c] = work[c], send_[C + c] = work[stride + c];
    }

    /// The gathered sums (recv_: P messages of 2C) added in rank order, then dX; weight and
    /// bias grads accumulate process `rank`'s own sums.
    template <class VX, class VDY, class VDX, class Epi>
    void apply_sums(const VX& X, const VDY& dY, const VDX& dX, int P, int rank, Epi epi) noexcept
    {
        const index_t C = X.sizes()[1];
        const T nf = static_cast<T>(global_count_);
        const std::size_t own = static_cast<std::size_t>(rank) * 2 * static_cast<std::size_t>(C);
        for (index_t c = 0; c < C; ++c) {
            double sum = 0, dotp = 0; // rank order: the same bits on every process
            for (int r = 0; r < P; ++r) {
                sum += recv_[static_cast<std::size_t>(r * 2 * C + c)];
                dotp += recv_[static_cast<std::size_t>(r * 2 * C + C + c)];
            }
            const T invstd = bn_.invstd_[c];
            if (bn_.affine_) { // this process's contribution
                bn_.bias_grad_[c] += static_cast<T>(recv_[own + static_cast<std::size_t>(c)]);
                bn_.weight_grad_[c] +=
                    static_cast<T>(recv_[own + static_cast<std::size_t>(C + c)] * static_cast<double>(invstd));
            }
            bn_.grad_mean_[c] = static_cast<T>(sum / static_cast<double>(global_count_));
            bn_.k_[c] = nn::rules::rounded(nn::rules::rounded(static_cast<T>(dotp) * invstd) * invstd) / nf;
        }
        if (X.shape().numel() == 0) return;
        const auto f = bn_type::specialize(X.as_const()).form();
        const kernels::bn_backward_coeffs<T> cf{bn_.coeffs(), bn_.invstd_.data(), bn_.gamma_.data(),
                                             bn_.grad_mean_.data(), bn_.k_.data()};
        kernels::for_channel_groups(f, [&](index_t c0, index_t c1) {
            kernels::backward_elementwise<true>(f, c0, c1, X.data(), dY.data(), dX.data(), cf, epi);
        });
    }

    using bn_type = BatchNorm3d<StaticC, T>;

    /// The forward's global half, after the exchange: the P gathered messages (recv_) merged
    /// in rank order -> the finalization with the global count -> the record backward needs.
    void commit_forward(index_t C, const std::array<index_t, 5>& sz, const void* x, const void* y,
                        std::string_view layout, std::string_view epilogue, int P) noexcept
    {
        const kernels::moments_out<T> m = bn_.moments();
        const std::int64_t n = merge_moments(C, m, P); // m.mean, m.m2: the global batch's mean and ATen's var_sum
        for (index_t c = 0; c < C; ++c) bn_.gamma_[c] = bn_.gamma_of(c);
        typename bn_type::train_finalizer fin{&bn_, n, bn_.track_, T(0)};
        if (bn_.track_) {
            ++bn_.nbt_;
            fin.momentum = static_cast<T>(bn_.momentum_ ? *bn_.momentum_ : 1.0 / static_cast<double>(bn_.nbt_));
        }
        if (n > 0) fin(0, C);
        bn_.remember(x, y, sz, layout, true, epilogue);
        synced_ = true;
        global_count_ = n;
    }
    void commit_forward(index_t C, const std::array<index_t, 5>& sz, const void* x, const void* y,
                        std::string_view layout, std::string_view epilogue) noexcept
    {
        commit_forward(C, sz, x, y, layout, epilogue, comm_.size());
    }

    /// The fused block's copy: see BatchNorm3d::rebind_input.
    void rebind_input(const void* from, const void* to) noexcept { bn_.rebind_input(from, to); }

    SyncBatchNorm3d(const bn_type& bn, communicator_ref comm) : bn_(bn), comm_(comm) {}

    /// What every process tells the others before anything is committed (fixed size).
    struct header {
        std::int64_t ok = 1;
        std::int64_t channels = 0;
        std::int64_t count = 0; // values per channel of this process's part
        char message[232] = {};
    };
    static_assert(sizeof(header) == 256);

    template <class Check>
    header try_local(Check&& check) noexcept
    {
        header h;
        try {
            check();
        } catch (const std::exception& e) {
            h.ok = 0;
            std::memcpy(h.message, e.what(), std::min(std::strlen(e.what()), sizeof(h.message) - 1));
        }
        return h;
    }

    /// N*D*H*W, or -1 when it overflows (an error on every process).
    static std::int64_t values_per_channel(const std::array<index_t, 5>& sz) noexcept
    {
        index_t v = 1;
        for (int d : {0, 2, 3, 4})
            if (__builtin_mul_overflow(v, sz[d], &v)) return -1;
        return v;
    }

    void prepare_buffers(index_t C)
    {
        const auto P = static_cast<std::size_t>(comm_.size());
        if ((2 * static_cast<std::size_t>(C) + 1) * sizeof(double) > static_cast<std::size_t>(INT_MAX))
            throw error("SyncBatchNorm3d: " + std::to_string(C) + " channels are more than one all-gather carries");
        send_.resize(2 * static_cast<std::size_t>(C) + 1); // the forward's message: count, mean, M2
        recv_.resize(P * (2 * static_cast<std::size_t>(C) + 1));
    }

    /// The agreement round: every process learns every other's outcome, channel count and
    /// count, and all take the same decision.  Returns the global count per channel.
    std::int64_t agree(header h, const std::array<index_t, 5>& sz)
    {
        h.channels = sz[1];
        const int P = comm_.size(), me = comm_.rank();
        std::vector<header> all(static_cast<std::size_t>(P));
        comm_.all_gather(&h, all.data(), sizeof(header));
        if (!h.ok) throw error(h.message);
        for (int r = 0; r < P; ++r)
            if (!all[static_cast<std::size_t>(r)].ok)
                throw error("SyncBatchNorm3d: process " + std::to_string(r) + " of " + std::to_string(P) +
                            " failed: " + all[static_cast<std::size_t>(r)].message);
        std::int64_t n = 0;
        bool overflow = false;
        for (int r = 0; r < P; ++r) {
            const header& o = all[static_cast<std::size_t>(r)];
            if (o.channels != h.channels)
                throw error("SyncBatchNorm3d: processes disagree on the channel count: process " + std::to_string(me) +
                            " has " + std::to_string(h.channels) + ", process " + std::to_string(r) + " has " +
                            std::to_string(o.channels));
            overflow |= o.count < 0 || __builtin_add_overflow(n, o.count, &n);
        }
        if (overflow) throw error("SyncBatchNorm3d: the global batch's values per channel overflow 64 bits");
        if (n == 1)
            throw error("Expected more than 1 value per channel when training, got input size " +
                        detail::sizes_str(sz));
        return n;
    }

    /// Chan's merge of the P gathered messages (recv_) in rank order; leaves the global mean
    /// in m.mean and ATen's var_sum (deviations from the mean rounded to T) in m.m2, and
    /// returns the global count.
    std::int64_t merge_moments(index_t C, const kernels::moments_out<T>& m, int P) noexcept
    {
        const auto each = static_cast<std::size_t>(2 * C + 1);
        std::int64_t total = 0;
        for (int r = 0; r < P; ++r) total += static_cast<std::int64_t>(recv_[static_cast<std::size_t>(r) * each]);
        for (index_t c = 0; c < C; ++c) {
            double n = 0, mean = 0, m2 = 0;
            for (int r = 0; r < P; ++r) {
                const double* msg = recv_.data() + static_cast<std::size_t>(r) * each;
                kernels::chan_merge_scalar(n, mean, m2, msg[0], msg[1 + c], msg[1 + C + c]);
            }
            m.mean[c] = mean;
            m.m2[c] = kernels::var_sum_about_rounded_mean<T>(n, mean, m2);
        }
        return total;
    }

    bn_type bn_;
    communicator_ref comm_;
    bool synced_ = false;            // the last forward was a training (collective) one
    std::int64_t global_count_ = 0;  // its global values per channel
    std::vector<double> send_, recv_;
};

} // namespace volfuse
