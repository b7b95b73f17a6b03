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
#include <ATen/EmptyTensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <bit>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include <volfuse/volfuse.hpp>

#include "output_pool.hpp"

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

void check_channel_args(int64_t C, const Tensor& x, const optional<Tensor>& w, const optional<Tensor>& b,
                        const optional<Tensor>& rm, const optional<Tensor>& rv);

/// Checks every tensor argument of batch_norm before anything runs: CPU, float32/float64,
/// 5-D input, per-channel tensors of the input's dtype with C elements (ATen's messages).
void check_forward_args(const Tensor& x, const optional<Tensor>& w, const optional<Tensor>& b,
                        const optional<Tensor>& rm, const optional<Tensor>& rv)
{
    if (x.dim() != 5) fail("expected 5D input (got " + std::to_string(x.dim()) + "D input)");
    if (!x.device().is_cpu()) fail(std::string(op_prefix) + "input is on " + x.device().str() + "; volfuse runs on CPU tensors");
    if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble)
        fail(std::string(op_prefix) + "input has dtype " + dtype_name(x) + "; volfuse supports Float and Double");
    check_channel_args(x.size(1), x, w, b, rm, rv);
}

/// The per-channel tensors of a batch norm over C channels: CPU, x's dtype, C elements, running
/// statistics both or neither, no bias without a weight.
void check_channel_args(int64_t C, const Tensor& x, const optional<Tensor>& w, const optional<Tensor>& b,
                        const optional<Tensor>& rm, const optional<Tensor>& rv)
{
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
    if (!(w && w->defined()) && b && b->defined()) fail(std::string(op_prefix) + "bias without weight is not supported");
}

/// A new tensor shaped like x in layout l, in memory from the output pool (output_pool.hpp:
/// fresh memory's page faults cost more than the kernels).
Tensor empty_output(const Tensor& x, layout l)
{
    return at::detail::empty_generic(x.sizes(), &volfuse_torch::output_pool::instance(),
                                     c10::DispatchKeySet(c10::DispatchKey::CPU), x.scalar_type(), format_of(l));
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

/// fn(T{}) for the input's dtype (float32 or float64; checked before).
template <class Fn>
decltype(auto) by_dtype(const Tensor& x, Fn&& fn)
{
    if (x.scalar_type() == at::kDouble) return fn(double{});
    return fn(float{});
}

/// t in layout l: t itself when it already is; from the other of the two layouts, volfuse's
/// tiled transpose (vf::reorder) into pooled memory (ATen's strided copy took 7.4 ms for the
/// video network's [4,64,8,32,32] gradient, NCDHW to channels-last, on the Zen 3 VM); any other
/// strides (or dtype, or rank: the callers' checks then raise), ATen's copy.
Tensor in_layout(const Tensor& t, layout l)
{
    const at::MemoryFormat f = format_of(l);
    if (t.is_contiguous(f)) return t;
    const layout other = l == layout::ndhwc ? layout::ncdhw : layout::ndhwc;
    const bool float_type = t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
    if (t.dim() != 5 || !float_type || !t.is_contiguous(format_of(other)) || t.numel() == 0) return t.contiguous(f);
    Tensor out = empty_output(t, l);
    by_dtype(t, [&]<class T>(T) {
        by_layout(other, [&](auto LF) {
            by_layout(l, [&](auto LT) { vf::reorder(view_of<T, decltype(LF)>(t).as_const(), view_of<T, decltype(LT)>(out)); });
        });
    });
    return out;
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

/// A new output for x (layout l) filled by run(X, Y, epilogue): a module's forward on the two
/// views, with ReLU fused or not; volfuse's errors become PyTorch's.
template <class T, class Run>
Tensor forward_output(const Tensor& x, layout l, bool relu, Run&& run)
{
    Tensor y = empty_output(x, l);
    try {
        by_layout(l, [&](auto L) {
            const auto X = view_of<T, decltype(L)>(x).as_const();
            const auto Y = view_of<T, decltype(L)>(y);
            if (relu) run(X, Y, vf::relu);
            else run(X, Y, vf::identity);
        });
    } catch (const vf::error& e) {
        fail(e.what());
    }
    return y;
}

/// A module's parameters and running statistics from the op's tensors (those given).
template <class BN>
void load_state(BN& bn, const optional<Tensor>& w, const optional<Tensor>& b, const optional<Tensor>& rm,
                const optional<Tensor>& rv)
{
    if (w && w->defined()) {
        load(bn.weight(), *w);
        if (b && b->defined()) load(bn.bias(), *b);
        else std::fill(bn.bias().begin(), bn.bias().end(), 0); // F.batch_norm(weight=w, bias=None)
    }
    if (rm && rm->defined()) load(bn.running_mean(), *rm), load(bn.running_var(), *rv);
}

/// Writes a module's new running statistics back into the caller's buffers (after success).
template <class BN>
void store_running(BN& bn, const optional<Tensor>& rm, const optional<Tensor>& rv, const at::TensorOptions& o)
{
    const auto C = static_cast<int64_t>(bn.running_mean().size());
    rm->copy_(at::from_blob(bn.running_mean().data(), {C}, o));
    rv->copy_(at::from_blob(bn.running_var().data(), {C}, o));
}

template <class T>
std::tuple<Tensor, Tensor> batch_norm_cpu_t(const Tensor& input, const optional<Tensor>& w, const optional<Tensor>& b,
                                            const optional<Tensor>& rm, const optional<Tensor>& rv, bool training,
                                            double momentum, double eps, bool relu)
{
    const bool affine = w && w->defined(), track = rm && rm->defined();
    const layout l = layout_of(input);
    const Tensor x = in_layout(input, l); // a copy only for strides volfuse cannot view
    const int64_t C = x.size(1);
    vf::BatchNorm3d<vf::dynamic, T> bn(C, eps, momentum, affine, track);
    load_state(bn, w, b, rm, rv);
    bn.train(training);
    Tensor reserve = at::zeros({vf::detail::saved_forward::rows, C}, x.options());
    Tensor y = forward_output<T>(x, l, relu, [&](const auto& X, const auto& Y, auto epi) { bn.forward(X, Y, epi); });
    // Committed: the module ran; its new running statistics go back into the buffers.
    if (track && training) store_running(bn, rm, rv, x.options());
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

/// The backward ops' arguments: grad_output like input, the forward's reserve.
void check_backward_args(const Tensor& grad_out, const Tensor& input, const optional<Tensor>& w, const Tensor& reserve,
                         const char* op)
{
    check_forward_args(input, w, {}, {}, {});
    if (!grad_out.sizes().equals(input.sizes()) || grad_out.scalar_type() != input.scalar_type() ||
        !grad_out.device().is_cpu())
        fail(std::string(op) + ": grad_output must be a CPU tensor of the input's dtype and shape");
    const int64_t C = input.size(1);
    if (reserve.scalar_type() != input.scalar_type() || reserve.numel() != vf::detail::saved_forward::rows * C)
        fail(std::string(op) + ": reserve is not the forward's (expected " + std::to_string(vf::detail::saved_forward::rows) +
             " x " + std::to_string(C) + " " + dtype_name(input) + ")");
}

template <class T>
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu_t(const Tensor& grad_out, const Tensor& input,
                                                             const optional<Tensor>& w, const Tensor& reserve,
                                                             bool batch_stats, bool relu, double eps,
                                                             std::array<bool, 3> mask)
{
    const bool affine = w && w->defined();
    const layout l = layout_of(input);
    const Tensor x = in_layout(input, l);
    const Tensor dy = in_layout(grad_out, l); // the input's layout
    const int64_t C = x.size(1);
    vf::BatchNorm3d<vf::dynamic, T> bn(C, eps, 0.1, affine, false);
    Tensor dx = empty_output(x, l);
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
    check_backward_args(grad_out, input, w, reserve, "volfuse::batch_norm_backward");
    if (input.scalar_type() == at::kDouble)
        return batch_norm_backward_cpu_t<double>(grad_out, input, w, reserve, batch_stats, relu, eps, mask);
    return batch_norm_backward_cpu_t<float>(grad_out, input, w, reserve, batch_stats, relu, eps, mask);
}

// --- SyncBatchNorm's local phases ------------------------------------------------------
// volfuse.SyncBatchNorm (Python) runs the all-gathers over a torch.distributed process group
// (a 1.13 operator cannot take one) between these ops, which are vf::SyncBatchNorm3d's split
// phases on this process's part of the batch:
//   sync_batch_norm_message -> all-gather -> sync_batch_norm
//   sync_batch_norm_backward_message -> all-gather -> sync_batch_norm_backward
// The messages are float64 tensors (counts, moments, sums) whatever the input's dtype.

constexpr std::string_view sync_prefix = "volfuse::sync_batch_norm: ";

Tensor message_tensor(const std::vector<double>& m)
{
    return at::from_blob(const_cast<double*>(m.data()), {static_cast<int64_t>(m.size())}, at::kDouble).clone();
}

/// The gathered messages as doubles: a CPU float64 tensor.
std::span<const double> gathered_span(const Tensor& g)
{
    if (!g.device().is_cpu() || g.scalar_type() != at::kDouble || !g.is_contiguous())
        fail(std::string(sync_prefix) + "gathered must be a contiguous CPU Double tensor, got " + dtype_name(g) + " on " +
             g.device().str());
    return {g.data_ptr<double>(), static_cast<std::size_t>(g.numel())};
}

template <class T>
Tensor sync_message_t(const Tensor& input, double eps)
{
    const layout l = layout_of(input);
    const Tensor x = in_layout(input, l);
    vf::solo_communicator solo;
    vf::SyncBatchNorm3d<vf::dynamic, T> bn(x.size(1), solo, eps, 0.1, false, false);
    std::vector<double> m;
    try {
        by_layout(l, [&](auto L) { m = bn.forward_message(view_of<T, decltype(L)>(x).as_const()); });
    } catch (const vf::error& e) {
        fail(e.what());
    }
    return message_tensor(m);
}

Tensor sync_message_cpu(const Tensor& input, const optional<Tensor>& w, const optional<Tensor>& b,
                        const optional<Tensor>& rm, const optional<Tensor>& rv, double eps)
{
    check_forward_args(input, w, b, rm, rv); // all of the forward's arguments: errors before the gathers
    if (input.scalar_type() == at::kDouble) return sync_message_t<double>(input, eps);
    return sync_message_t<float>(input, eps);
}

template <class T>
std::tuple<Tensor, Tensor> sync_forward_t(const Tensor& input, const optional<Tensor>& w, const optional<Tensor>& b,
                                          const optional<Tensor>& rm, const optional<Tensor>& rv,
                                          std::span<const double> gathered, double momentum, double eps, bool relu)
{
    const layout l = layout_of(input);
    const Tensor x = in_layout(input, l);
    const int64_t C = x.size(1);
    vf::solo_communicator solo;
    vf::SyncBatchNorm3d<vf::dynamic, T> bn(C, solo, eps, momentum, w && w->defined(), rm && rm->defined());
    load_state(bn, w, b, rm, rv);
    Tensor reserve = at::zeros({vf::detail::saved_forward::rows, C}, x.options());
    Tensor y = forward_output<T>(x, l, relu,
                                 [&](const auto& X, const auto& Y, auto epi) { bn.forward_merged(X, Y, gathered, epi); });
    if (rm && rm->defined()) store_running(bn, rm, rv, x.options());
    vf::detail::saved_forward::save_sync(bn, span_of<T>(reserve), C);
    return {y, reserve};
}

std::tuple<Tensor, Tensor> sync_forward_cpu(const Tensor& input, const optional<Tensor>& w, const optional<Tensor>& b,
                                            const optional<Tensor>& rm, const optional<Tensor>& rv,
                                            const Tensor& gathered, double momentum, double eps, bool relu)
{
    check_forward_args(input, w, b, rm, rv);
    const auto g = gathered_span(gathered);
    if (input.scalar_type() == at::kDouble)
        return sync_forward_t<double>(input, w, b, rm, rv, g, momentum, eps, relu);
    return sync_forward_t<float>(input, w, b, rm, rv, g, momentum, eps, relu);
}

/// The backward's tensors in the input's layout, and a module ready for backward_message /
/// backward_merged (the forward's state restored from the reserve).
template <class T, class Fn>
void with_sync_backward(const Tensor& grad_out, const Tensor& input, const optional<Tensor>& w, const Tensor& reserve,
                        int64_t global_count, bool relu, double eps, Fn&& fn)
{
    const layout l = layout_of(input);
    const Tensor x = in_layout(input, l);
    const Tensor dy = in_layout(grad_out, l);
    const Tensor saved = reserve.contiguous();
    vf::solo_communicator solo;
    vf::SyncBatchNorm3d<vf::dynamic, T> bn(x.size(1), solo, eps, 0.1, w && w->defined(), false);
    try {
        by_layout(l, [&](auto L) {
            const auto X = view_of<T, decltype(L)>(x).as_const();
            vf::detail::saved_forward::restore_sync(bn, X, std::span<const T>(span_of<T>(saved)), global_count,
                                                    relu ? vf::expr::relu_t::name : vf::expr::identity_t::name);
            fn(bn, X, view_of<T, decltype(L)>(dy).as_const(), l, x);
        });
    } catch (const vf::error& e) {
        fail(e.what());
    }
}

Tensor sync_backward_message_cpu(const Tensor& grad_out, const Tensor& input, const optional<Tensor>& w,
                                 const Tensor& reserve, int64_t global_count, bool relu, double eps)
{
    check_backward_args(grad_out, input, w, reserve, "volfuse::sync_batch_norm_backward_message");
    Tensor msg;
    auto run = [&]<class T>(T) {
        with_sync_backward<T>(grad_out, input, w, reserve, global_count, relu, eps,
                              [&](auto& bn, const auto& X, const auto& DY, layout, const Tensor&) {
                                  // backward_message writes no dX: the checks only need one (dY's memory).
                                  using V = std::remove_cvref_t<decltype(X)>;
                                  const auto DX = vf::make_view<typename V::layout_type>(
                                      const_cast<T*>(DY.data()), std::span<const vf::index_t>(X.sizes()));
                                  msg = message_tensor(relu ? bn.backward_message(X, DY, DX, vf::relu)
                                                               : bn.backward_message(X, DY, DX));
                              });
    };
    if (input.scalar_type() == at::kDouble) run(double{});
    else run(float{});
    return msg;
}

std::tuple<Tensor, Tensor, Tensor> sync_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                     const optional<Tensor>& w, const Tensor& reserve,
                                                     int64_t global_count, const Tensor& gathered, int64_t rank,
                                                     bool relu, double eps, std::array<bool, 3> mask)
{
    check_backward_args(grad_out, input, w, reserve, "volfuse::sync_batch_norm_backward");
    const auto g = gathered_span(gathered);
    Tensor dx, gw, gb;
    auto run = [&]<class T>(T) {
        with_sync_backward<T>(grad_out, input, w, reserve, global_count, relu, eps,
                              [&](auto& bn, const auto& X, const auto& DY, layout l, const Tensor& x) {
                                  using V = std::remove_cvref_t<decltype(X)>;
                                  dx = empty_output(x, l);
                                  const auto DX = view_of<T, typename V::layout_type>(dx);
                                  if (relu) bn.backward_merged(X, DY, DX, g, static_cast<int>(rank), vf::relu);
                                  else bn.backward_merged(X, DY, DX, g, static_cast<int>(rank));
                                  const int64_t C = x.size(1);
                                  if (w && w->defined() && mask[1])
                                      gw = at::from_blob(const_cast<T*>(bn.weight_grad().data()), {C}, x.options()).clone();
                                  if (w && w->defined() && mask[2])
                                      gb = at::from_blob(const_cast<T*>(bn.bias_grad().data()), {C}, x.options()).clone();
                              });
    };
    if (rank < 0 || rank > INT_MAX) fail("volfuse::sync_batch_norm_backward: rank " + std::to_string(rank) + " is out of range");
    if (input.scalar_type() == at::kDouble) run(double{});
    else run(float{});
    if (!mask[0]) dx = Tensor();
    return {dx, gw, gb};
}

// --- Conv3d and the fused Conv3d -> BatchNorm3d -> ReLU block ---------------------------
//   volfuse::conv3d(input, weight, bias?, stride[3], padding[3], dilation[3]) -> output
//   volfuse::conv3d_backward(grad_output, input, weight, stride, padding, dilation,
//                            output_mask[3]) -> (grad_input, grad_weight, grad_bias)
//   volfuse::conv_bn_relu3d(input, weight, conv_bias?, bn_weight?, bn_bias?, running_mean?,
//                           running_var?, stride, padding, dilation, training, momentum,
//                           eps) -> (output, conv_output, reserve)
// The fused op runs vf::ConvBnReLU3d: with batch statistics the BN's moments come from the
// conv's epilogue and conv_output is the conv result it kept (channels_last_3d), which the
// backward (batch_norm_backward, then conv3d_backward) takes as the BN's input; with running
// statistics the BN is folded into the conv and conv_output, reserve are empty.
// float32 and float64, as batch_norm.

std::string sizes_of(at::IntArrayRef s)
{
    std::vector<vf::index_t> v(s.begin(), s.end());
    return vf::detail::sizes_str(v);
}

vf::size3 triple(at::IntArrayRef v, const std::string& op, const char* name)
{
    if (v.size() == 1) return vf::size3(v[0]);
    if (v.size() != 3) fail(op + ": " + name + " must have 1 or 3 elements, got " + std::to_string(v.size()));
    return {v[0], v[1], v[2]};
}

struct conv_config {
    vf::size3 stride, padding, dilation;
};

conv_config conv_config_of(at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d, const std::string& op)
{
    return {triple(s, op, "stride"), triple(p, op, "padding"), triple(d, op, "dilation")};
}

/// conv3d's tensors: CPU, one dtype (float32), 5-D input and weight, a bias of out_channels
/// elements (ATen's messages where it has one).  The module checks the geometry and the input's
/// shape against the weight when it runs.
void check_conv_args(const Tensor& x, const Tensor& w, const optional<Tensor>& b, const std::string& op)
{
    const bool has_b = b && b->defined();
    if (!x.device().is_cpu() || !w.device().is_cpu() || (has_b && !b->device().is_cpu()))
        fail(op + ": input, weight and bias must be CPU tensors; volfuse runs on CPU tensors");
    if (w.dim() != 5)
        fail(op + ": expected a 5-D weight [out_channels, in_channels, kD, kH, kW], got weight of size " +
             sizes_of(w.sizes()));
    if (x.dim() != 5)
        fail("Expected 5-dimensional input for 5-dimensional weight " + sizes_of(w.sizes()) + ", but got " +
             std::to_string(x.dim()) + "-dimensional input of size " + sizes_of(x.sizes()) + " instead");
    if (w.scalar_type() != x.scalar_type() || (has_b && b->scalar_type() != x.scalar_type()))
        fail("Input type (" + dtype_name(x) + ") and weight type (" + dtype_name(w) + ")" +
             (has_b ? " and bias type (" + dtype_name(*b) + ")" : std::string()) + " should be the same");
    if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble)
        fail(op + ": input has dtype " + dtype_name(x) + "; volfuse supports Float and Double");
    if (has_b && (b->dim() != 1 || b->numel() != w.size(0)))
        fail("Given weight of size " + sizes_of(w.sizes()) + ", expected bias to be 1-dimensional with " +
             std::to_string(w.size(0)) + " elements, but got bias of size " + sizes_of(b->sizes()) + " instead");
}

/// Modules kept per thread by configuration: their workspaces (packed weights, reorder
/// buffers, the kept conv output) stay allocated across calls, and a call costs no
/// construction (Conv3d's initializes its weights).  Bounded: cleared past `limit` entries.
template <class M>
class module_cache {
public:
    using key = std::vector<int64_t>;
    template <class Make>
    M& get(const key& k, Make&& make)
    {
        auto it = modules_.find(k);
        if (it != modules_.end()) return *it->second;
        if (modules_.size() >= limit) modules_.clear();
        return *modules_.emplace(k, std::make_unique<M>(make())).first->second;
    }

private:
    static constexpr std::size_t limit = 32;
    std::map<key, std::unique_ptr<M>> modules_;
};

std::vector<int64_t> conv_key(const Tensor& w, const conv_config& c, bool bias)
{
    std::vector<int64_t> k(w.sizes().begin(), w.sizes().end());
    for (const vf::size3& t : {c.stride, c.padding, c.dilation}) k.insert(k.end(), {t.d, t.h, t.w});
    k.push_back(bias);
    return k;
}

template <class T>
using conv_t = vf::Conv3d<vf::conv_spec{}, T>;

template <class T>
conv_t<T> make_conv(const Tensor& w, const conv_config& c, bool bias)
{
    return conv_t<T>(w.size(1), w.size(0), {w.size(2), w.size(3), w.size(4)}, c.stride, c.padding, c.dilation, 1,
                     bias);
}

/// The conv module for weight w (and a bias or not), holding w's values (and b's).
template <class T>
conv_t<T>& conv_module(const Tensor& w, const optional<Tensor>& b, const conv_config& c, bool bias)
{
    thread_local module_cache<conv_t<T>> cache;
    auto& conv = cache.get(conv_key(w, c, bias), [&] { return make_conv<T>(w, c, bias); });
    load(conv.weight(), w);
    if (b && b->defined()) load(conv.bias(), *b);
    else std::fill(conv.bias().begin(), conv.bias().end(), T(0));
    return conv;
}

/// PyTorch's output sizes of the conv (0 where the input is too small: the module then raises
/// PyTorch's message before anything is written).
std::vector<int64_t> conv_output_sizes(const Tensor& x, const Tensor& w, const conv_config& c)
{
    std::vector<int64_t> o{x.size(0), w.size(0)};
    for (int i = 0; i < 3; ++i) {
        const int64_t span = c.dilation[i] * (w.size(2 + i) - 1) + 1;
        const int64_t v = (x.size(2 + i) + 2 * c.padding[i] - span) / std::max<int64_t>(c.stride[i], 1) + 1;
        o.push_back(std::max<int64_t>(v, 0));
    }
    return o;
}

Tensor empty_output(at::IntArrayRef sizes, const Tensor& like, layout l)
{
    return at::detail::empty_generic(sizes, &volfuse_torch::output_pool::instance(),
                                     c10::DispatchKeySet(c10::DispatchKey::CPU), like.scalar_type(), format_of(l));
}

/// run() with volfuse's errors (a module's construction or call) as PyTorch's.
template <class Run>
void as_torch_errors(Run&& run)
{
    try {
        run();
    } catch (const vf::error& e) {
        fail(e.what());
    }
}

Tensor conv3d_cpu(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation)
{
    const std::string op = "volfuse::conv3d";
    check_conv_args(input, weight, bias, op);
    const conv_config c = conv_config_of(stride, padding, dilation, op);
    const layout l = layout_of(input);
    const Tensor x = in_layout(input, l);
    Tensor y = empty_output(conv_output_sizes(x, weight, c), x, l);
    by_dtype(x, [&]<class T>(T) {
        as_torch_errors([&] {
            auto& conv = conv_module<T>(weight, bias, c, bias && bias->defined());
            by_layout(l, [&](auto L) { conv.forward(view_of<T, decltype(L)>(x).as_const(), view_of<T, decltype(L)>(y)); });
        });
    });
    return y;
}

std::tuple<Tensor, Tensor, Tensor> conv3d_backward_cpu(const Tensor& grad_out, const Tensor& input,
                                                       const Tensor& weight, at::IntArrayRef stride,
                                                       at::IntArrayRef padding, at::IntArrayRef dilation,
                                                       std::array<bool, 3> mask)
{
    const std::string op = "volfuse::conv3d_backward";
    check_conv_args(input, weight, {}, op);
    const conv_config c = conv_config_of(stride, padding, dilation, op);
    if (!grad_out.device().is_cpu() || grad_out.scalar_type() != input.scalar_type())
        fail(op + ": grad_output must be a CPU tensor of the input's dtype, got " + dtype_name(grad_out) + " on " +
             grad_out.device().str());
    // Channels-last when either tensor is (the fused block's backward hands the conv output's
    // gradient over channels-last): one copy of the other into the kernels' own layout, none
    // inside the module.  The module checks grad_output's sizes.
    const layout l = layout_of(grad_out) == layout::ndhwc ? layout::ndhwc : layout_of(input);
    const Tensor x = in_layout(input, l);
    const Tensor dy = in_layout(grad_out, l);
    Tensor dx, gw, gb;
    if (mask[0]) dx = empty_output(x, l);
    by_dtype(x, [&]<class T>(T) {
        as_torch_errors([&] {
            auto& conv = conv_module<T>(weight, {}, c, mask[2]);
            conv.zero_grad();
            by_layout(l, [&](auto L) {
                using V = decltype(L);
                const auto X = view_of<T, V>(x).as_const();
                const auto DY = view_of<T, V>(dy).as_const();
                if (mask[0] && !mask[1] && !mask[2]) conv.backward_input(DY, view_of<T, V>(dx));
                else if (mask[0]) conv.backward(X, DY, view_of<T, V>(dx));
                else if (mask[1] || mask[2]) conv.backward_weight(X, DY);
            });
            if (mask[1])
                gw = at::from_blob(const_cast<T*>(conv.weight_grad().data()), weight.sizes(), x.options()).clone();
            if (mask[2])
                gb = at::from_blob(const_cast<T*>(conv.bias_grad().data()), {weight.size(0)}, x.options()).clone();
        });
    });
    return {dx, gw, gb};
}

std::tuple<Tensor, Tensor, Tensor> conv_bn_relu3d_cpu(const Tensor& input, const Tensor& weight,
                                                      const optional<Tensor>& conv_bias, const optional<Tensor>& w,
                                                      const optional<Tensor>& b, const optional<Tensor>& rm,
                                                      const optional<Tensor>& rv, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                                      bool training, double momentum, double eps)
{
    const std::string op = "volfuse::conv_bn_relu3d";
    check_conv_args(input, weight, conv_bias, op);
    check_channel_args(weight.size(0), input, w, b, rm, rv);
    const conv_config c = conv_config_of(stride, padding, dilation, op);
    const bool affine = w && w->defined(), track = rm && rm->defined(), has_cb = conv_bias && conv_bias->defined();
    const layout l = layout_of(input);
    const Tensor x = in_layout(input, l);
    const int64_t C = weight.size(0);
    const auto osz = conv_output_sizes(x, weight, c);
    Tensor y = empty_output(osz, x, l), z, reserve;
    const bool batch_stats = training || !track;
    // Every output allocated before the module commits anything (running statistics).
    if (batch_stats) {
        reserve = at::zeros({vf::detail::saved_forward::rows, C}, x.options());
        z = empty_output(osz, x, layout::ndhwc);
    }
    by_dtype(x, [&]<class T>(T) {
        using bn_t = vf::BatchNorm3d<vf::dynamic, T>;
        using block_t = vf::ConvBnReLU3d<vf::conv_spec{}, vf::dynamic, bn_t>;
        thread_local module_cache<block_t> cache;
        as_torch_errors([&] {
            auto key = conv_key(weight, c, has_cb);
            key.insert(key.end(), {affine, track, static_cast<int64_t>(std::bit_cast<std::uint64_t>(eps))});
            auto& block = cache.get(key, [&] { return block_t(make_conv<T>(weight, c, has_cb), bn_t(C, eps)); });
            load(block.conv().weight(), weight);
            if (has_cb) load(block.conv().bias(), *conv_bias);
            block.bn() = bn_t(C, eps, momentum, affine, track);
            load_state(block.bn(), w, b, rm, rv);
            block.train(training);
            by_layout(l, [&](auto L) {
                const auto xv = view_of<T, decltype(L)>(x).as_const();
                // Batch statistics: the conv keeps its output z straight in the returned tensor.
                if (batch_stats) block.forward(xv, view_of<T, decltype(L)>(y), view_of<T, vf::ndhwc_t>(z));
                else block.forward(xv, view_of<T, decltype(L)>(y));
            });
            // Committed: the forward ran.
            if (track && training) store_running(block.bn(), rm, rv, x.options());
            if (batch_stats && x.numel() > 0) vf::detail::saved_forward::save(block.bn(), span_of<T>(reserve), C);
        });
    });
    if (!z.defined()) z = at::empty({0}, x.options()), reserve = at::empty({0}, x.options());
    return {y, z, reserve};
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
        variable_list out(8);
        if (!(need[0] && go.requires_grad()) && !(need[1] && x.requires_grad()) && !(need[2] && w.requires_grad()))
            return out;
        at::AutoGradMode enable(true);
        // The formula on aliases of the saved tensors: the grads asked for are the formula's own.
        // (On go, x themselves, grad() would also follow go's history back into x, which the
        // engine already does with the grad returned for go: that path would count twice.)
        // Aliases stay connected to the originals, so create_graph gives higher orders.
        const Tensor a[3] = {go.view_as(go), x.view_as(x), w.defined() ? w.view_as(w) : w};
        for (int i = 0; i < 3; ++i)
            if (need[i] && a[i].defined() && a[i].requires_grad()) inputs.push_back(a[i]), which.push_back(i);
        const auto f = backward_formula(a[0], a[1], a[2], reserve, ctx->saved_data["batch_stats"].toBool(),
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


// --- autograd of the conv ops -------------------------------------------------------------
// conv3d is bilinear in (input, weight), so every derivative of conv3d_backward is a conv3d or
// a conv3d_backward again: the derivatives call the ops through the dispatcher, and any order
// of differentiation runs volfuse's kernels.

using conv_fn_t = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, at::IntArrayRef, at::IntArrayRef,
                         at::IntArrayRef);
using conv_bwd_fn_t = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef,
                                                         at::IntArrayRef, at::IntArrayRef, std::array<bool, 3>);
using cbr_fn_t = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const optional<Tensor>&,
                                                    const optional<Tensor>&, const optional<Tensor>&,
                                                    const optional<Tensor>&, const optional<Tensor>&, at::IntArrayRef,
                                                    at::IntArrayRef, at::IntArrayRef, bool, double, double);

template <class Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name)
{
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}
c10::TypedOperatorHandle<conv_fn_t> conv_op()
{
    static const auto op = find_op<conv_fn_t>("volfuse::conv3d");
    return op;
}
c10::TypedOperatorHandle<conv_bwd_fn_t> conv_backward_op()
{
    static const auto op = find_op<conv_bwd_fn_t>("volfuse::conv3d_backward");
    return op;
}
c10::TypedOperatorHandle<cbr_fn_t> cbr_op()
{
    static const auto op = find_op<cbr_fn_t>("volfuse::conv_bn_relu3d");
    return op;
}

/// A conv's geometry kept in an autograd context.
void save_geometry(AutogradContext* ctx, at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d)
{
    ctx->saved_data["stride"] = s.vec();
    ctx->saved_data["padding"] = p.vec();
    ctx->saved_data["dilation"] = d.vec();
}
struct saved_geometry {
    std::vector<int64_t> s, p, d;
    explicit saved_geometry(AutogradContext* ctx)
        : s(ctx->saved_data["stride"].toIntVector()), p(ctx->saved_data["padding"].toIntVector()),
          d(ctx->saved_data["dilation"].toIntVector())
    {
    }
};

struct conv3d_function : torch::autograd::Function<conv3d_function> {
    static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const optional<Tensor>& b,
                                 at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d)
    {
        at::AutoDispatchBelowADInplaceOrView guard;
        Tensor y = conv_op().call(x, w, b, s, p, d);
        ctx->save_for_backward({x, w});
        save_geometry(ctx, s, p, d);
        ctx->saved_data["has_bias"] = bool(b && b->defined());
        return {y};
    }
    static variable_list backward(AutogradContext* ctx, variable_list g)
    {
        const auto v = ctx->get_saved_variables();
        const saved_geometry geo(ctx);
        variable_list out(6);
        if (!g[0].defined()) return out;
        const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                       ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
        auto [dx, dw, db] = conv_backward_op().call(g[0], v[0], v[1], geo.s, geo.p, geo.d, mask);
        out[0] = dx, out[1] = dw, out[2] = db;
        return out;
    }
};

Tensor conv3d_autograd(const Tensor& x, const Tensor& w, const optional<Tensor>& b, at::IntArrayRef s,
                       at::IntArrayRef p, at::IntArrayRef d)
{
    return conv3d_function::apply(x, w, b, s, p, d)[0];
}

struct conv3d_backward_function : torch::autograd::Function<conv3d_backward_function> {
    static variable_list forward(AutogradContext* ctx, const Tensor& go, const Tensor& x, const Tensor& w,
                                 at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d, std::array<bool, 3> mask)
    {
        at::AutoDispatchBelowADInplaceOrView guard;
        auto [dx, dw, db] = conv_backward_op().call(go, x, w, s, p, d, mask);
        ctx->save_for_backward({go, x, w});
        save_geometry(ctx, s, p, d);
        for (int k = 0; k < 3; ++k) ctx->saved_data["out" + std::to_string(k)] = mask[k];
        ctx->set_materialize_grads(false);
        auto or_empty = [&](const Tensor& t) { return t.defined() ? t : at::empty({0}, x.options()); };
        return {or_empty(dx), or_empty(dw), or_empty(db)};
    }
    /// With dX = Dx(go, w), dW = Dw(x, go), db = sum(go) and their grads ggx, ggw, ggb:
    /// d/dgo = conv3d(ggx, w) + conv3d(x, ggw) + ggb, d/dx = Dx(go, ggw), d/dw = Dw(ggx, go).
    static variable_list backward(AutogradContext* ctx, variable_list gg)
    {
        const auto v = ctx->get_saved_variables();
        const Tensor &go = v[0], &x = v[1], &w = v[2];
        const saved_geometry geo(ctx);
        auto given = [&](int k) { return ctx->saved_data["out" + std::to_string(k)].toBool() && gg[k].defined(); };
        const bool ggx = given(0), ggw = given(1), ggb = given(2);
        variable_list out(7);
        if (ctx->needs_input_grad(0)) {
            Tensor r;
            auto add = [&](const Tensor& t) { r = r.defined() ? r + t : t; };
            if (ggx) add(conv_op().call(gg[0], w, {}, geo.s, geo.p, geo.d));
            if (ggw) add(conv_op().call(x, gg[1], {}, geo.s, geo.p, geo.d));
            if (ggb) add(gg[2].reshape({1, -1, 1, 1, 1}).expand(go.sizes()));
            out[0] = r;
        }
        if (ctx->needs_input_grad(1) && ggw)
            out[1] = std::get<0>(conv_backward_op().call(go, x, gg[1], geo.s, geo.p, geo.d, {true, false, false}));
        if (ctx->needs_input_grad(2) && ggx)
            out[2] = std::get<1>(conv_backward_op().call(go, gg[0], w, geo.s, geo.p, geo.d, {false, true, false}));
        return out;
    }
};

std::tuple<Tensor, Tensor, Tensor> conv3d_backward_autograd(const Tensor& go, const Tensor& x, const Tensor& w,
                                                            at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d,
                                                            std::array<bool, 3> mask)
{
    auto r = conv3d_backward_function::apply(go, x, w, s, p, d, mask);
    return {mask[0] ? r[0] : Tensor(), mask[1] ? r[1] : Tensor(), mask[2] ? r[2] : Tensor()};
}

/// The fused block in training: its forward is the fused op, which also returns the conv
/// output z; the backward is batch_norm_backward (on z) then conv3d_backward, both
/// differentiable, and z an output of this node, so higher orders reach x and w through it.
struct conv_bn_relu_function : torch::autograd::Function<conv_bn_relu_function> {
    static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const optional<Tensor>& cb,
                                 const optional<Tensor>& bw, const optional<Tensor>& bb, const optional<Tensor>& rm,
                                 const optional<Tensor>& rv, at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d,
                                 bool training, double momentum, double eps)
    {
        at::AutoDispatchBelowADInplaceOrView guard;
        auto [y, z, reserve] = cbr_op().call(x, w, cb, bw, bb, rm, rv, s, p, d, training, momentum, eps);
        ctx->save_for_backward({x, w, defined_or_empty(bw), z, reserve});
        save_geometry(ctx, s, p, d);
        // needs_input_grad counts the tensors given (absent optionals have no edge).
        const bool given[3] = {cb && cb->defined(), bw && bw->defined(), bb && bb->defined()};
        int64_t edge = 2;
        for (int i = 0; i < 3; ++i) ctx->saved_data["edge" + std::to_string(i)] = given[i] ? edge++ : int64_t{-1};
        ctx->saved_data["eps"] = eps;
        ctx->mark_non_differentiable({reserve});
        ctx->set_materialize_grads(false);
        return {y, z, reserve};
    }
    static variable_list backward(AutogradContext* ctx, variable_list g)
    {
        const auto v = ctx->get_saved_variables();
        const Tensor &x = v[0], &w = v[1], &bw = v[2], &z = v[3], &reserve = v[4];
        const saved_geometry geo(ctx);
        variable_list out(13);
        auto needs = [&](int i) { // conv bias, bn weight, bn bias
            const int64_t e = ctx->saved_data["edge" + std::to_string(i)].toInt();
            return e >= 0 && ctx->needs_input_grad(static_cast<std::size_t>(e));
        };
        Tensor dz;
        if (g[0].defined()) {
            const optional<Tensor> wopt = bw.defined() ? optional<Tensor>(bw) : c10::nullopt;
            auto [dzz, dgamma, dbeta] = bn_backward_op().call(g[0], z, wopt, reserve, true, true,
                                                              ctx->saved_data["eps"].toDouble(), {true, needs(1), needs(2)});
            dz = dzz, out[3] = dgamma, out[4] = dbeta;
        }
        if (g[1].defined()) dz = dz.defined() ? dz + g[1] : g[1];
        if (!dz.defined()) return out;
        const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), needs(0)};
        auto [dx, dw, db] = conv_backward_op().call(dz, x, w, geo.s, geo.p, geo.d, mask);
        out[0] = dx, out[1] = dw, out[2] = db;
        return out;
    }
};

bool wants_grad(std::initializer_list<const Tensor*> ts)
{
    if (!at::GradMode::is_enabled()) return false;
    for (const Tensor* t : ts)
        if (t->defined() && t->requires_grad()) return true;
    return false;
}

std::tuple<Tensor, Tensor, Tensor> conv_bn_relu3d_autograd(const Tensor& x, const Tensor& w,
                                                           const optional<Tensor>& cb, const optional<Tensor>& bw,
                                                           const optional<Tensor>& bb, const optional<Tensor>& rm,
                                                           const optional<Tensor>& rv, at::IntArrayRef s,
                                                           at::IntArrayRef p, at::IntArrayRef d, bool training,
                                                           double momentum, double eps)
{
    const bool batch_stats = training || !(rm && rm->defined());
    const Tensor cbt = defined_or_empty(cb), bwt = defined_or_empty(bw), bbt = defined_or_empty(bb);
    if (batch_stats) {
        auto r = conv_bn_relu_function::apply(x, w, cb, bw, bb, rm, rv, s, p, d, training, momentum, eps);
        return {r[0], r[1], r[2]};
    }
    if (!wants_grad({&x, &w, &cbt, &bwt, &bbt})) {
        at::AutoDispatchBelowADInplaceOrView guard;
        return cbr_op().call(x, w, cb, bw, bb, rm, rv, s, p, d, training, momentum, eps);
    }
    // Running statistics with gradients wanted (a backward through an eval-mode block): the
    // conv and the BN's ops, each differentiable.
    Tensor z = conv_op().call(x, w, cb, s, p, d);
    auto [y, reserve] = bn_op().call(z, bw, bb, rm, rv, false, momentum, eps, true);
    return {y, z, reserve};
}

} // namespace

TORCH_LIBRARY(volfuse, m)
{
    m.def("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
          "bool training, float momentum, float eps, bool relu=False) -> (Tensor, Tensor)");
    m.def("batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor reserve, bool batch_stats, "
          "bool relu, float eps, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
    m.def("sync_batch_norm_message(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
          "Tensor? running_var, float eps) -> Tensor");
    m.def("sync_batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
          "Tensor(b!)? running_var, Tensor gathered, float momentum, float eps, bool relu=False) -> (Tensor, Tensor)");
    m.def("sync_batch_norm_backward_message(Tensor grad_output, Tensor input, Tensor? weight, Tensor reserve, "
          "int global_count, bool relu, float eps) -> Tensor");
    m.def("sync_batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor reserve, "
          "int global_count, Tensor gathered, int rank, bool relu, float eps, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
    m.def("conv3d(Tensor input, Tensor weight, Tensor? bias, int[3] stride, int[3] padding, int[3] dilation) -> Tensor");
    m.def("conv3d_backward(Tensor grad_output, Tensor input, Tensor weight, int[3] stride, int[3] padding, "
          "int[3] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
    m.def("conv_bn_relu3d(Tensor input, Tensor weight, Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, "
          "Tensor(a!)? running_mean, Tensor(b!)? running_var, int[3] stride, int[3] padding, int[3] dilation, "
          "bool training, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(volfuse, CPU, m)
{
    m.impl("batch_norm", &batch_norm_cpu);
    m.impl("batch_norm_backward", &batch_norm_backward_cpu);
    m.impl("sync_batch_norm_message", &sync_message_cpu);
    m.impl("sync_batch_norm", &sync_forward_cpu);
    m.impl("sync_batch_norm_backward_message", &sync_backward_message_cpu);
    m.impl("sync_batch_norm_backward", &sync_backward_cpu);
    m.impl("conv3d", &conv3d_cpu);
    m.impl("conv3d_backward", &conv3d_backward_cpu);
    m.impl("conv_bn_relu3d", &conv_bn_relu3d_cpu);
}

TORCH_LIBRARY_IMPL(volfuse, Autograd, m)
{
    m.impl("batch_norm", &batch_norm_autograd);
    m.impl("batch_norm_backward", &batch_norm_backward_autograd);
    m.impl("conv3d", &conv3d_autograd);
    m.impl("conv3d_backward", &conv3d_backward_autograd);
    m.impl("conv_bn_relu3d", &conv_bn_relu3d_autograd);
}
