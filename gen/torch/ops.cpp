// volfuse's PyTorch operators: the CPU kernels (volfuse's float32 and float64 BatchNorm3d on
// torch tensors viewed without copies) and their autograd kernels, registered in the
// dispatcher, so that Python (torch.ops.volfuse.*), libtorch C++ programs and TorchScript
// reach the same ops.  Loaded by the `volfuse` Python package (volfuse/__init__.py).
//
//   volfuse::batch_norm(input, weight?, bias?, running_mean?, running_var?, training,
//                       momentum, eps, relu) -> (output, reserve)
//   volfuse::batch_norm_backward(grad_output, input, weight?, reserve, batch_stats, relu,
//                                eps, output_mask[3]) -> (grad_input, grad_weight, grad_bias)
//
// `momentum` is the factor of this step (PyTorch's exponential_average_factor: the caller
// turns momentum=None into 1/num_batches_tracked, as F.batch_norm's callers do).  `reserve`
// holds what backward needs (detail::saved_forward's rows), as cuDNN's reserve space does.
// batch_norm_backward has an autograd kernel too: its derivatives (double backward, as
// gradgradcheck and create_graph=True need) are ATen's autograd of the same formula.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <span>
#include <string>
#include <tuple>

#include <volfuse/volfuse.hpp>

namespace {

namespace vf = volfuse;
using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr std::string_view op_prefix = "volfuse::batch_norm: ";

/// Throws PyTorch's error type (RuntimeError in Python) with volfuse's message.
[[noreturn]] void fail(const std::string& msg) { TORCH_CHECK(false, msg); }

std::string dtype_name(const Tensor& t) { return std::string(c10::toString(t.scalar_type())); }

/// The memory layouts volfuse views without a copy: contiguous (NCDHW) and channels_last_3d
/// (NDHWC).  Anything else is copied into the first.
enum class layout { ncdhw, ndhwc };

layout layout_of(const Tensor& t)
{
    if (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return layout::ndhwc;
    return layout::ncdhw;
}
at::MemoryFormat format_of(layout l)
{
    return l == layout::ndhwc ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
}

/// Checks every tensor argument of batch_norm before anything runs: CPU, float32/float64,
/// 5-D input, per-channel tensors of the input's dtype with C elements (ATen's messages).
void check_forward_args(const Tensor& x, const optional<Tensor>& w, const optional<Tensor>& b,
                        const optional<Tensor>& rm, const optional<Tensor>& rv)
{
    if (x.dim() != 5) fail("expected 5D input (got " + std::to_string(x.dim()) + "D input)");
    if (!x.device().is_cpu()) fail(std::string(op_prefix) + "input is on " + x.device().str() + "; volfuse runs on CPU tensors");
    if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble)
        fail(std::string(op_prefix) + "input has dtype " + dtype_name(x) + "; volfuse supports Float and Double");
    const int64_t C = x.size(1);
    auto per_channel = [&](const optional<Tensor>& t, const char* name) {
        if (!t || !t->defined()) return;
        if (!t->device().is_cpu()) fail(std::string(op_prefix) + name + " is on " + t->device().str());
        if (t->scalar_type() != x.scalar_type())
            fail(std::string(op_prefix) + "expected " + name + " to have dtype " + dtype_name(x) + " (the input's), got " +
                 dtype_name(*t));
        if (t->dim() != 1 || t->numel() != C)
            fail(std::string(name) + " should contain " + std::to_string(C) + " elements not " + std::to_string(t->numel()));
    };
    per_channel(rm, "running_mean");
    per_channel(rv, "running_var");
    per_channel(w, "weight");
    per_channel(b, "bias");
    if (bool(rm && rm->defined()) != bool(rv && rv->defined()))
        fail(std::string(op_prefix) + "running_mean and running_var must both be given or both be None");
}

/// A volfuse view (layout L) of a 5-D tensor's memory, the tensor being in that layout.
template <class T, class L>
auto view_of(const Tensor& t)
{
    const auto s = t.sizes();
    const std::array<vf::index_t, 5> sz{s[0], s[1], s[2], s[3], s[4]};
    return vf::make_view<L>(t.data_ptr<T>(), std::span<const vf::index_t>(sz));
}

/// fn(L{}) with L the volfuse layout type of l: each layout instantiates its own kernels.
template <class Fn>
decltype(auto) by_layout(layout l, Fn&& fn)
{
    if (l == layout::ndhwc) return fn(vf::ndhwc_t{});
    return fn(vf::ncdhw_t{});
}

template <class T>
std::span<T> span_of(const Tensor& t)
{
    return {t.data_ptr<T>(), static_cast<std::size_t>(t.numel())};
}

/// Copies a per-channel tensor (any strides) into a module's span.
template <class T>
void load(std::span<T> to, const Tensor& from)
{
    const Tensor c = from.contiguous();
    std::copy_n(c.data_ptr<T>(), to.size(), to.data());
}

template <class T>
std::tuple<Tensor, Tensor> batch_norm_cpu_t(const Tensor& input, const optional<Tensor>& w, const optional<Tensor>& b,
                                            const optional<Tensor>& rm, const optional<Tensor>& rv, bool training,
                                            double momentum, double eps, bool relu)
{
    const bool affine = w && w->defined(), track = rm && rm->defined();
    const layout l = layout_of(input);
    const Tensor x = input.contiguous(format_of(l)); // a copy only for strides volfuse cannot view
    const int64_t C = x.size(1);
    vf::BatchNorm3d<vf::dynamic, T> bn(C, eps, momentum, affine, track);
    if (affine) {
        load(bn.weight(), *w);
        if (b && b->defined()) load(bn.bias(), *b);
    } else if (b && b->defined()) {
        fail(std::string(op_prefix) + "bias without weight is not supported");
    }
    if (track) load(bn.running_mean(), *rm), load(bn.running_var(), *rv);
    bn.train(training);
    Tensor y = at::empty_like(x, x.options(), format_of(l));
    Tensor reserve = at::zeros({vf::detail::saved_forward::rows, C}, x.options());
    try {
        by_layout(l, [&](auto L) {
            const auto X = view_of<T, decltype(L)>(x).as_const();
            const auto Y = view_of<T, decltype(L)>(y);
            if (relu) bn.forward(X, Y, vf::relu);
            else bn.forward(X, Y);
        });
    } catch (const vf::error& e) {
        fail(e.what());
    }
    // Committed: the module ran; its new running statistics go back into the buffers.
    if (track && training) {
        rm->copy_(at::from_blob(bn.running_mean().data(), {C}, x.options()));
        rv->copy_(at::from_blob(bn.running_var().data(), {C}, x.options()));
    }
    if (x.numel() > 0) vf::detail::saved_forward::save(bn, span_of<T>(reserve), C);
    return {y, reserve};
}

std::tuple<Tensor, Tensor> batch_norm_cpu(const Tensor& input, const optional<Tensor>& w, const optional<Tensor>& b,
                                          const optional<Tensor>& rm, const optional<Tensor>& rv, bool training,
                                          double momentum, double eps, bool relu)
{
    check_forward_args(input, w, b, rm, rv);
    if (input.scalar_type() == at::kDouble)
        return batch_norm_cpu_t<double>(input, w, b, rm, rv, training, momentum, eps, relu);
    return batch_norm_cpu_t<float>(input, w, b, rm, rv, training, momentum, eps, relu);
}

template <class T>
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu_t(const Tensor& grad_out, const Tensor& input,
                                                             const optional<Tensor>& w, const Tensor& reserve,
                                                             bool batch_stats, bool relu, double eps,
                                                             std::array<bool, 3> mask)
{
    const bool affine = w && w->defined();
    const layout l = layout_of(input);
    const Tensor x = input.contiguous(format_of(l));
    const Tensor dy = grad_out.contiguous(format_of(l)); // the input's layout
    const int64_t C = x.size(1);
    vf::BatchNorm3d<vf::dynamic, T> bn(C, eps, 0.1, affine, false);
    Tensor dx = at::empty_like(x, x.options(), format_of(l));
    const Tensor saved = reserve.contiguous();
    try {
        by_layout(l, [&](auto L) {
            const auto X = view_of<T, decltype(L)>(x).as_const();
            const auto DY = view_of<T, decltype(L)>(dy).as_const();
            const auto DX = view_of<T, decltype(L)>(dx);
            vf::detail::saved_forward::restore(bn, X, std::span<const T>(span_of<T>(saved)), batch_stats,
                                              relu ? vf::expr::relu_t::name : vf::expr::identity_t::name);
            if (relu) bn.backward(X, DY, DX, vf::relu);
            else bn.backward(X, DY, DX);
        });
    } catch (const vf::error& e) {
        fail(e.what());
    }
    Tensor gw, gb;
    if (affine && mask[1]) gw = at::from_blob(const_cast<T*>(bn.weight_grad().data()), {C}, x.options()).clone();
    if (affine && mask[2]) gb = at::from_blob(const_cast<T*>(bn.bias_grad().data()), {C}, x.options()).clone();
    if (!mask[0]) dx = Tensor();
    return {dx, gw, gb};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                           const optional<Tensor>& w, const Tensor& reserve,
                                                           bool batch_stats, bool relu, double eps,
                                                           std::array<bool, 3> mask)
{
    check_forward_args(input, w, {}, {}, {});
    if (!grad_out.sizes().equals(input.sizes()) || grad_out.scalar_type() != input.scalar_type() ||
        !grad_out.device().is_cpu())
        fail("volfuse::batch_norm_backward: grad_output must be a CPU tensor of the input's dtype and shape");
    const int64_t C = input.size(1);
    if (reserve.scalar_type() != input.scalar_type() || reserve.numel() != vf::detail::saved_forward::rows * C)
        fail("volfuse::batch_norm_backward: reserve is not the forward's (expected " +
             std::to_string(vf::detail::saved_forward::rows) + " x " + std::to_string(C) + " " + dtype_name(input) + ")");
    if (input.scalar_type() == at::kDouble)
        return batch_norm_backward_cpu_t<double>(grad_out, input, w, reserve, batch_stats, relu, eps, mask);
    return batch_norm_backward_cpu_t<float>(grad_out, input, w, reserve, batch_stats, relu, eps, mask);
}

// --- autograd ----------------------------------------------------------------------------

using bn_fn_t = std::tuple<Tensor, Tensor>(const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                                           const optional<Tensor>&, const optional<Tensor>&, bool, double, double, bool);
using bn_bwd_fn_t = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const optional<Tensor>&,
                                                       const Tensor&, bool, bool, double, std::array<bool, 3>);

c10::TypedOperatorHandle<bn_fn_t> bn_op()
{
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("volfuse::batch_norm", "").typed<bn_fn_t>();
    return op;
}
c10::TypedOperatorHandle<bn_bwd_fn_t> bn_backward_op()
{
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("volfuse::batch_norm_backward", "").typed<bn_bwd_fn_t>();
    return op;
}

Tensor defined_or_empty(const optional<Tensor>& t) { return t && t->defined() ? *t : Tensor(); }

/// The pre-activation's ReLU mask from the reserve's coefficients (constant under differentiation).
Tensor relu_mask(const Tensor& x, const Tensor& reserve)
{
    const auto C = x.size(1);
    auto row = [&](int r) { return reserve[r].reshape({1, C, 1, 1, 1}); };
    const Tensor pre = ((x - row(0)) - row(1)) * row(2) + row(3);
    return pre.gt(0).to(x.scalar_type());
}

/// batch_norm's gradients (dx, dw, db) written with ATen ops, differentiable in grad_out, x and
/// w: what batch_norm_backward's own derivatives are taken of.  Batch statistics are
/// recomputed from x (their derivatives are part of the second order); running ones are the
/// reserve's constants.
std::array<Tensor, 3> backward_formula(const Tensor& go, const Tensor& x, const Tensor& w, const Tensor& reserve,
                                       bool batch_stats, bool relu, double eps)
{
    const auto C = x.size(1);
    const std::vector<int64_t> dims{0, 2, 3, 4};
    const Tensor g = relu ? go * relu_mask(x.detach(), reserve) : go;
    const Tensor gamma = w.defined() ? w.reshape({1, C, 1, 1, 1}) : at::ones({1, C, 1, 1, 1}, x.options());
    Tensor mean, invstd;
    if (batch_stats) {
        mean = x.mean(dims, true);
        invstd = ((x - mean).pow(2).mean(dims, true) + eps).rsqrt();
    } else {
        mean = (reserve[0] + reserve[1]).reshape({1, C, 1, 1, 1});
        invstd = reserve[4].reshape({1, C, 1, 1, 1});
    }
    const Tensor xhat = (x - mean) * invstd;
    const Tensor db = g.sum(dims), dw = (g * xhat).sum(dims);
    Tensor dx;
    if (batch_stats) {
        const double n = static_cast<double>(x.numel() / std::max<int64_t>(C, 1));
        dx = gamma * invstd * (g - db.reshape({1, C, 1, 1, 1}) / n - xhat * dw.reshape({1, C, 1, 1, 1}) / n);
    } else {
        dx = g * invstd * gamma;
    }
    return {dx, dw, db};
}

struct batch_norm_backward_function : torch::autograd::Function<batch_norm_backward_function> {
    static variable_list forward(AutogradContext* ctx, const Tensor& go, const Tensor& x, const optional<Tensor>& w,
                                 const Tensor& reserve, bool batch_stats, bool relu, double eps,
                                 std::array<bool, 3> mask)
    {
        at::AutoDispatchBelowADInplaceOrView guard;
        auto [dx, dw, db] = bn_backward_op().call(go, x, w, reserve, batch_stats, relu, eps, mask);
        ctx->save_for_backward({go, x, defined_or_empty(w), reserve});
        ctx->saved_data["batch_stats"] = batch_stats;
        ctx->saved_data["relu"] = relu;
        ctx->saved_data["eps"] = eps;
        const bool affine = w && w->defined();
        ctx->saved_data["out0"] = mask[0];
        ctx->saved_data["out1"] = affine && mask[1];
        ctx->saved_data["out2"] = affine && mask[2];
        ctx->set_materialize_grads(false);
        // A Function's outputs must be defined: grads not asked for travel as empty
        // placeholders (batch_norm_backward_autograd hands them back as undefined).
        auto or_empty = [&](const Tensor& t) { return t.defined() ? t : at::empty({0}, x.options()); };
        return {or_empty(dx), or_empty(dw), or_empty(db)};
    }
    static variable_list backward(AutogradContext* ctx, variable_list gg)
    {
        const auto s = ctx->get_saved_variables();
        const Tensor &go = s[0], &x = s[1], &w = s[2], &reserve = s[3];
        const bool create_graph = at::GradMode::is_enabled();
        variable_list inputs;
        std::vector<int> which;
        const bool need[3] = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), w.defined() && ctx->needs_input_grad(2)};
        const Tensor* in[3] = {&go, &x, &w};
        for (int i = 0; i < 3; ++i)
            if (need[i] && in[i]->requires_grad()) inputs.push_back(*in[i]), which.push_back(i);
        variable_list out(8);
        if (inputs.empty()) return out;
        at::AutoGradMode enable(true);
        const auto f = backward_formula(go, x, w, reserve, ctx->saved_data["batch_stats"].toBool(),
                                        ctx->saved_data["relu"].toBool(), ctx->saved_data["eps"].toDouble());
        variable_list outputs, grads;
        for (int k = 0; k < 3; ++k) // placeholders (grads not asked for) have no derivative
            if (ctx->saved_data["out" + std::to_string(k)].toBool() && gg[k].defined() && f[k].requires_grad())
                outputs.push_back(f[k]), grads.push_back(gg[k]);
        if (outputs.empty()) return out;
        const auto r = torch::autograd::grad(outputs, inputs, grads, /*retain_graph=*/true, create_graph,
                                             /*allow_unused=*/true);
        for (std::size_t j = 0; j < which.size(); ++j) out[which[j]] = r[j];
        return out;
    }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_autograd(const Tensor& go, const Tensor& x,
                                                                const optional<Tensor>& w, const Tensor& reserve,
                                                                bool batch_stats, bool relu, double eps,
                                                                std::array<bool, 3> mask)
{
    auto r = batch_norm_backward_function::apply(go, x, w, reserve, batch_stats, relu, eps, mask);
    const bool affine = w && w->defined();
    return {mask[0] ? r[0] : Tensor(), affine && mask[1] ? r[1] : Tensor(), affine && mask[2] ? r[2] : Tensor()};
}

struct batch_norm_function : torch::autograd::Function<batch_norm_function> {
    static variable_list forward(AutogradContext* ctx, const Tensor& x, const optional<Tensor>& w,
                                 const optional<Tensor>& b, const optional<Tensor>& rm, const optional<Tensor>& rv,
                                 bool training, double momentum, double eps, bool relu)
    {
        at::AutoDispatchBelowADInplaceOrView guard;
        auto [y, reserve] = bn_op().call(x, w, b, rm, rv, training, momentum, eps, relu);
        ctx->save_for_backward({x, defined_or_empty(w), reserve});
        ctx->saved_data["batch_stats"] = training || !(rm && rm->defined());
        ctx->saved_data["relu"] = relu;
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["has_bias"] = bool(b && b->defined());
        ctx->mark_non_differentiable({reserve});
        return {y, reserve};
    }
    static variable_list backward(AutogradContext* ctx, variable_list g)
    {
        const auto s = ctx->get_saved_variables();
        variable_list out(9);
        if (!g[0].defined()) return out;
        const bool has_w = s[1].defined(), has_b = ctx->saved_data["has_bias"].toBool();
        const std::array<bool, 3> mask{ctx->needs_input_grad(0), has_w && ctx->needs_input_grad(1),
                                       has_b && ctx->needs_input_grad(2)};
        const optional<Tensor> w = has_w ? optional<Tensor>(s[1]) : c10::nullopt;
        auto [dx, dw, db] = bn_backward_op().call(g[0], s[0], w, s[2], ctx->saved_data["batch_stats"].toBool(),
                                                  ctx->saved_data["relu"].toBool(), ctx->saved_data["eps"].toDouble(),
                                                  mask);
        out[0] = dx, out[1] = dw, out[2] = db;
        return out;
    }
};

std::tuple<Tensor, Tensor> batch_norm_autograd(const Tensor& x, const optional<Tensor>& w, const optional<Tensor>& b,
                                               const optional<Tensor>& rm, const optional<Tensor>& rv, bool training,
                                               double momentum, double eps, bool relu)
{
    auto r = batch_norm_function::apply(x, w, b, rm, rv, training, momentum, eps, relu);
    return {r[0], r[1]};
}

} // namespace

TORCH_LIBRARY(volfuse, m)
{
    m.def("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
          "bool training, float momentum, float eps, bool relu=False) -> (Tensor, Tensor)");
    m.def("batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor reserve, bool batch_stats, "
          "bool relu, float eps, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(volfuse, CPU, m)
{
    m.impl("batch_norm", &batch_norm_cpu);
    m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

TORCH_LIBRARY_IMPL(volfuse, Autograd, m)
{
    m.impl("batch_norm", &batch_norm_autograd);
    m.impl("batch_norm_backward", &batch_norm_backward_autograd);
}
