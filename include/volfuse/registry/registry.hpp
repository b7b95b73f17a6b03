// The run-time side of gen/: kernels specialized at compile time for the layers of a fixed
// architecture, found by (op, channel counts, kernel, stride, padding, dilation, layout).
// Generated code registers them (gen/volfuse_gen.cpp writes the registration); runtime-shaped
// modules (Conv3d<>, hence ConvBnReLU3d<>) look their shape up on each call and run the
// specialized instantiation when there is one, the runtime-shaped instantiation of the same
// kernel template otherwise.  lookup() says which and why.
// Entries live in the process-wide store (store.hpp), stamped with the ISA and ABI they were
// compiled for; a lookup only answers entries of its own stamp.  Thread safety: entries are
// added under an exclusive lock and looked up under a shared one; never removed, so a kernel
// found stays valid.
#pragma once

#include "../core/config.hpp"

#include <array>
#include <atomic>
#include <map>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <tuple>

#include "../expr/pointwise.hpp"
#include "../kernels/batch_norm.hpp"
#include "../kernels/conv3d.hpp"
#include "../schedule/conv_schedule.hpp"
#include "../shape/layout.hpp"
#include "../shape/shape.hpp"
#include "../shape/conv_geometry.hpp"
#include "store.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS::registry {

/// What a layer is; the generator's op names.
enum class op { conv, conv_bn_relu, batch_norm, bn_relu };
inline const char* op_name(op o) noexcept
{
    switch (o) {
    case op::conv: return "conv";
    case op::conv_bn_relu: return "conv_bn_relu";
    case op::batch_norm: return "batch_norm";
    case op::bn_relu: return "bn_relu";
    }
    return "?";
}

/// A layer's shape as the registry keys it (batch_norm / bn_relu: in = out = channels,
/// kernel/stride/padding/dilation unused).
struct key {
    op o = op::conv;
    index_t in = 0, out = 0;
    size3 kernel = 1, stride = 1, padding = 0, dilation = 1;
    std::string layout = "ncdhw";

    auto tie() const
    {
        return std::tie(o, in, out, kernel.d, kernel.h, kernel.w, stride.d, stride.h, stride.w, padding.d, padding.h,
                        padding.w, dilation.d, dilation.h, dilation.w, layout);
    }
    bool operator<(const key& k) const { return tie() < k.tie(); }
    std::string str() const
    {
        // Appended piece by piece: GCC 12 warns falsely (-Wrestrict, PR 105329) on chains of +.
        std::string s = op_name(o);
        s += " in=";
        s += std::to_string(in);
        s += " out=";
        s += std::to_string(out);
        if (o == op::conv || o == op::conv_bn_relu) {
            s += " kernel=";
            s += kernel.str();
            s += " stride=";
            s += stride.str();
            s += " padding=";
            s += padding.str();
            s += " dilation=";
            s += dilation.str();
        }
        s += " layout=";
        s += layout;
        return s;
    }
};

/// The runtime-shaped geometry every entry is called with.
using dynamic_geometry = conv_geometry<conv_spec{}>;

/// A conv layer's kernels on element type T, called through pointers with the run-time
/// geometry and schedule.  A specialized entry rebuilds its compile-time geometry from it (the
/// values are equal: the lookup key was), so every loop bound the spec fixes is a constant
/// inside.  The registry holds float32 entries; float64 convs run the fallback's.
template <class T>
struct basic_conv_kernels {
    void (*forward)(const dynamic_geometry&, const conv_schedule&, index_t N, kernels::conv::extents3 in,
                    kernels::conv::extents3 out, const T* x, const T* wp, const T* bias, T* y, bool relu,
                    double* moments);
    void (*grad_input)(const dynamic_geometry&, const conv_schedule&, index_t N, kernels::conv::extents3 in,
                       kernels::conv::extents3 out, const T* dy, const T* wt, T* dx);
    /// xp: the input with its padding made explicit (kernels::conv::pad_input); work: floats
    /// of kernels::conv::grad_weight_workspace.
    void (*grad_weight)(const dynamic_geometry&, const conv_schedule&, index_t N, kernels::conv::extents3 in,
                        kernels::conv::extents3 out, const T* xp, const T* dy, T* gw, T* work, index_t work_floats);
};
using conv_kernels = basic_conv_kernels<float>;

/// The kernels of one instantiation of the conv templates (S all dynamic: the fallback).
template <conv_spec S, class T = float>
basic_conv_kernels<T> conv_kernels_for() noexcept
{
    using G = conv_geometry<S>;
    namespace kc = kernels::conv;
    return {
        [](const dynamic_geometry& g, const conv_schedule& s, index_t N, kc::extents3 in, kc::extents3 out,
           const T* x, const T* wp, const T* bias, T* y, bool relu, double* moments) {
            const G gs{g.in_, g.out_, g.k_, g.s_, g.p_, g.dil_};
            if (relu) kc::forward(gs, s, N, in, out, x, wp, bias, y, expr::relu_t{}, moments);
            else kc::forward(gs, s, N, in, out, x, wp, bias, y, expr::identity_t{}, moments);
        },
        [](const dynamic_geometry& g, const conv_schedule& s, index_t N, kc::extents3 in, kc::extents3 out,
           const T* dy, const T* wt, T* dx) {
            kc::grad_input(G{g.in_, g.out_, g.k_, g.s_, g.p_, g.dil_}, s, N, in, out, dy, wt, dx);
        },
        [](const dynamic_geometry& g, const conv_schedule& s, index_t N, kc::extents3 in, kc::extents3 out,
           const T* xp, const T* dy, T* gw, T* work, index_t work_floats) {
            kc::grad_weight(G{g.in_, g.out_, g.k_, g.s_, g.p_, g.dil_}, s, N, in, out, xp, dy, gw, work, work_floats);
        },
    };
}

#ifdef VOLFUSE_EXTERN_FALLBACK_KERNELS
// The runtime-shaped conv kernels are the largest instantiation a TU can make (every tile
// shape for every channel tail).  A build defining this macro compiles them once, in one TU
// that includes <volfuse/registry/fallback_kernels.hpp> (docs/gen.md), instead of in every TU.
extern template conv_kernels conv_kernels_for<conv_spec{}>() noexcept;
#endif

// --- batch norm ----------------------------------------------------------------------

/// A per-channel callback passed through a pointer (the kernels' finalize arguments).
template <class... A>
struct callback {
    const void* ctx;
    void (*fn)(const void*, A...);
    void operator()(A... a) const { fn(ctx, a...); }
    template <class F>
    static callback of(const F& f) noexcept
    {
        return {&f, [](const void* c, A... a) { (*static_cast<const F*>(c))(a...); }};
    }
};
using train_finalize = callback<index_t, index_t>;
using backward_finalize = callback<index_t, double, double>;

/// The channel form of a runtime-shaped view of layout L (what BatchNorm3d<> runs on).
template <class L>
using dynamic_form = decltype(L::form(std::declval<const shape5<index_t, index_t, index_t, index_t, index_t>&>()));

/// BatchNorm3d's kernels for one layout, called through pointers with the runtime-shaped
/// form; a specialized entry runs them with the channel count fixed at compile time.
template <class L>
struct bn_kernels {
    void (*train)(const dynamic_form<L>&, kernels::batch_stats_policy, const float* x, float* y,
                  const kernels::moments_out<>&, const kernels::bn_coeffs_out<>&, double* work, train_finalize, bool relu);
    void (*normalize)(const dynamic_form<L>&, const float* x, float* y, const kernels::bn_coeffs<>&, bool relu);
    void (*backward)(const dynamic_form<L>&, bool batch_stats, kernels::batch_stats_policy, const float* x,
                     const float* dy, float* dx, const kernels::bn_backward_coeffs<>&, double* work, backward_finalize,
                     bool relu);
};

/// The kernels of one instantiation: C fixed (C = dynamic: the runtime-shaped fallback).
template <index_t C, class L>
bn_kernels<L> bn_kernels_for() noexcept
{
    static constexpr auto form_of = [](const dynamic_form<L>& f) {
        if constexpr (C == dynamic) return f;
        else return channel_form{f.outer, fix<C>, f.inner};
    };
    return {
        [](const dynamic_form<L>& f, kernels::batch_stats_policy p, const float* x, float* y,
           const kernels::moments_out<>& m, const kernels::bn_coeffs_out<>& k, double* work, train_finalize fin, bool relu) {
            if (relu) kernels::batch_norm_train(form_of(f), p, x, y, m, k, work, fin, expr::relu_t{});
            else kernels::batch_norm_train(form_of(f), p, x, y, m, k, work, fin, expr::identity_t{});
        },
        [](const dynamic_form<L>& f, const float* x, float* y, const kernels::bn_coeffs<>& k, bool relu) {
            const auto g = form_of(f);
            if (relu) kernels::normalize(g, 0, value_of(g.channels), x, y, k, expr::relu_t{});
            else kernels::normalize(g, 0, value_of(g.channels), x, y, k, expr::identity_t{});
        },
        [](const dynamic_form<L>& f, bool batch_stats, kernels::batch_stats_policy p, const float* x, const float* dy,
           float* dx, const kernels::bn_backward_coeffs<>& cf, double* work, backward_finalize fin, bool relu) {
            const auto g = form_of(f);
            if (batch_stats && relu) kernels::batch_norm_backward<true>(g, p, x, dy, dx, cf, work, fin, expr::relu_t{});
            else if (batch_stats) kernels::batch_norm_backward<true>(g, p, x, dy, dx, cf, work, fin, expr::identity_t{});
            else if (relu) kernels::batch_norm_backward<false>(g, p, x, dy, dx, cf, work, fin, expr::relu_t{});
            else kernels::batch_norm_backward<false>(g, p, x, dy, dx, cf, work, fin, expr::identity_t{});
        },
    };
}

/// A registered layer: its kernels and where the generator took it from.
struct entry {
    conv_kernels conv{};
    std::string origin; // "gen/examples/video.arch:3 (conv1)"
    /// The layer's schedule as `volfuse_gen --tune` measured it (its tuned_for says where).
    std::optional<conv_schedule> schedule{};
    bn_kernels<ncdhw_t> bn_ncdhw{};
    bn_kernels<ndhwc_t> bn_ndhwc{};
};

/// The answer to a lookup: the kernels to run and the schedule to run them with, and why those
/// (schedule.origin says why that schedule).
struct choice {
    const conv_kernels* kernels = nullptr;
    bool specialized = false;
    std::string why;
    const entry* found = nullptr; // the registered entry (its bn kernels), or null
    conv_schedule schedule{};
};

/// This ISA's view of the process-wide store (store.hpp): registrations are stamped with the
/// ISA and ABI they were compiled for; a lookup answers only entries of its own stamp, and says
/// why when it refuses one of another (the generated sources built with another -march).
class table {
public:
    /// A table of its own (for tests and tools); global() is the one over the process's store.
    table() : own_(std::make_unique<registry_store::store>()), store_(own_.get()) {}
    explicit table(registry_store::store& s) noexcept : store_(&s) {}

    /// Adds the entry for k; the first registration of a key (per stamp) wins: an entry, once
    /// found, never changes under its user.  Returns whether it was added.
    bool add(const key& k, entry e)
    {
        auto p = std::make_shared<const entry>(std::move(e));
        std::string origin = p->origin;
        return store_->add(k.str(), {VOLFUSE_ABI_STAMP, std::move(origin), std::move(p)});
    }
    /// The specialized kernels for k, or the runtime-shaped fallback, and why.
    choice lookup(const key& k) const
    {
        if (!enabled_.load(std::memory_order_relaxed))
            return {&fallback(), false, "runtime-shaped fallback: registry disabled (set_enabled(false))", nullptr,
                    host_conv_schedule()};
        const std::string ks = k.str();
        const registry_store::record* other = nullptr;
        for (const registry_store::record* r : store_->find(ks)) {
            if (r->isa == VOLFUSE_ABI_STAMP) {
                const entry& e = *static_cast<const entry*>(r->entry.get());
                return {&e.conv, true, "specialized: generated for " + e.origin, &e,
                        pick_conv_schedule(e.schedule ? &*e.schedule : nullptr)};
            }
            if (!other) other = r;
        }
        if (other)
            return {&fallback(), false,
                    "runtime-shaped fallback: the generated kernels for " + ks + " (" + other->origin +
                        ") were compiled for " + other->isa + ", this code for " VOLFUSE_ABI_STAMP
                        ": refused (compile the generated sources with the flags of the code that uses them)",
                    nullptr, host_conv_schedule()};
        return {&fallback(), false, "runtime-shaped fallback: no generated kernel for " + ks, nullptr,
                host_conv_schedule()};
    }
    /// Turns lookups off (every lookup answers the fallback) or on: for comparing the
    /// specialized and runtime-shaped kernels on the same shapes.
    void set_enabled(bool on) noexcept
    {
        enabled_.store(on, std::memory_order_relaxed);
        store_->touch(); // modules resolve again
    }
    /// Entries registered for this ISA and ABI.
    std::size_t size() const { return store_->count(VOLFUSE_ABI_STAMP); }

private:
    static const conv_kernels& fallback()
    {
        static const conv_kernels k = conv_kernels_for<conv_spec{}>();
        return k;
    }
    std::unique_ptr<registry_store::store> own_;
    registry_store::store* store_;
    std::atomic<bool> enabled_{true};
};

/// This ISA's registry over the process-wide store, which generated code registers into.
inline table& global()
{
    static table t(registry_store::global());
    return t;
}

/// Changes whenever a lookup's answer could change (an entry added, the registry switched on
/// or off): modules keep their resolution until it moves.
inline std::uint64_t generation() noexcept { return registry_store::global().generation(); }

} // namespace volfuse::registry
