// The simple layers around the seed networks' conv blocks: MaxPool3d, AdaptiveAvgPool3d
// and Linear, forward and backward, with PyTorch's semantics for what they support (documented
// per class).  Plain loops: these layers move little data next to the convs they sit between.
#pragma once

#include "../core/config.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "../core/checks.hpp"
#include "../core/error.hpp"
#include "../core/format.hpp"
#include "../parallel/threads.hpp"
#include "../shape/conv_geometry.hpp"
#include "../shape/view.hpp"
#include "parameter.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

namespace detail {
/// A pooling call's tensors, checked before anything runs: both operands valid, Y of the
/// expected sizes and disjoint from X (pooling never runs in place).  Returns X's operand.
template <class VX, class VY>
operand check_pool_io(const VX& X, const VY& Y, const std::array<index_t, 5>& want, const char* who)
{
    static_assert(std::is_same_v<typename VX::layout_type, typename VY::layout_type>,
                  "pooling: input and output must have the same layout");
    static_assert(!std::is_const_v<typename VY::value_type>, "pooling: Y must be writable");
    const auto x = operand_of(X, "input"), y = operand_of(Y, "output");
    if (y.sizes != want)
        throw error(std::string(who) + ": output has shape " + sizes_str(y.sizes) + " but expected " + sizes_str(want) +
                    " for input " + sizes_str(x.sizes));
    check_disjoint(y, x);
    return x;
}
/// An output cell's input window: [lo, hi) per spatial dimension (d, h, w).
struct window3 {
    std::array<index_t, 3> lo, hi;
    index_t size() const noexcept { return (hi[0] - lo[0]) * (hi[1] - lo[1]) * (hi[2] - lo[2]); }
};
/// Calls cell(o, window(o)) for every output cell o = (od, oh, ow) of one (n, c) plane of an
/// output of sizes `out`, in (d, h, w) order (the order every pooling pass and its gradient use).
template <class Window, class Cell>
void for_each_cell(const std::array<index_t, 5>& out, Window window, Cell cell)
{
    for (index_t od = 0; od < out[2]; ++od)
        for (index_t oh = 0; oh < out[3]; ++oh)
            for (index_t ow = 0; ow < out[4]; ++ow) {
                const std::array<index_t, 3> o{od, oh, ow};
                cell(o, window(o));
            }
}
/// Sets one (n, c) plane of V (sizes `s`) to zero: a pooling gradient's start.
template <class V>
void zero_plane(const V& v, const std::array<index_t, 5>& s, index_t n, index_t c)
{
    for (index_t d = 0; d < s[2]; ++d)
        for (index_t h = 0; h < s[3]; ++h)
            for (index_t w = 0; w < s[4]; ++w) v(n, c, d, h, w) = 0.f;
}
/// a * b for a cost estimate (parallel_for's grain): saturates instead of overflowing.
inline index_t cost_mul(index_t a, index_t b) noexcept
{
    index_t r = 0;
    return mul_ok(a, b, r) ? r : std::numeric_limits<index_t>::max();
}
} // namespace detail

/// torch.nn.MaxPool3d(kernel_size, stride = kernel_size, padding = 0); no dilation,
/// ceil_mode or indices.  NaN propagates as in PyTorch (a NaN in the window wins).
/// Output extents are PyTorch's: floor((in + 2 * pad - kernel) / stride) + 1, with its checks
/// and messages (at construction for the arguments, at forward for the input).
class MaxPool3d {
public:
    explicit MaxPool3d(size3 kernel_size, std::optional<size3> stride = std::nullopt, size3 padding = 0)
        : k_(kernel_size), s_(stride.value_or(kernel_size)), p_(padding)
    {
        // ATen's pooling_output_shape per dimension (stride, then padding), then pool3d_shape_check.
        for (int i = 0; i < 3; ++i) {
            if (s_[i] == 0) throw error("stride should not be zero");
            if (p_[i] < 0) throw error("pad must be non-negative, but got pad: " + std::to_string(p_[i]));
            if (p_[i] > k_[i] / 2)
                throw error("pad should be at most half of kernel size, but got pad=" + std::to_string(p_[i]) +
                            " and kernel_size=" + std::to_string(k_[i]));
        }
        if (k_.d <= 0 || k_.h <= 0 || k_.w <= 0)
            throw error("kernel size should be greater than zero, but got kT: " + std::to_string(k_.d) +
                        " kH: " + std::to_string(k_.h) + " kW: " + std::to_string(k_.w));
        if (s_.d <= 0 || s_.h <= 0 || s_.w <= 0)
            throw error("stride should be greater than zero, but got dT: " + std::to_string(s_.d) +
                        " dH: " + std::to_string(s_.h) + " dW: " + std::to_string(s_.w));
    }
    size3 kernel_size() const noexcept { return k_; }
    size3 stride() const noexcept { return s_; }
    size3 padding() const noexcept { return p_; }

    /// PyTorch's output sizes for input sizes `in` (checked: throws PyTorch's errors for an
    /// empty non-batch dimension and for an output smaller than one).
    std::array<index_t, 5> output_sizes(const std::array<index_t, 5>& in) const
    {
        for (int i = 1; i < 5; ++i)
            if (in[i] <= 0)
                throw error("max_pool3d(): Expected input's non-batch dimensions to have positive length, but input "
                            "has a shape of " + detail::sizes_str(in) + " and non-batch dimension " +
                            std::to_string(i) + " has length zero!");
        std::array<index_t, 5> out{in[0], in[1], 0, 0, 0};
        for (int i = 0; i < 3; ++i) {
            // floor((in + 2p - k) / s) + 1: p <= k/2 so in + 2p - k <= in, and it may be negative.
            const index_t num = in[2 + i] - k_[i] + 2 * p_[i];
            out[2 + i] = (num >= 0 ? num / s_[i] : -((-num + s_[i] - 1) / s_[i])) + 1;
        }
        if (out[2] < 1 || out[3] < 1 || out[4] < 1)
            throw error("Given input size: (" + std::to_string(in[1]) + "x" + std::to_string(in[2]) + "x" +
                        std::to_string(in[3]) + "x" + std::to_string(in[4]) + "). Calculated output size: (" +
                        std::to_string(in[1]) + "x" + std::to_string(out[2]) + "x" + std::to_string(out[3]) + "x" +
                        std::to_string(out[4]) + "). Output size is too small");
        return out;
    }
    template <class VX, class VY>
    void forward(const VX& X, const VY& Y) const
    {
        const auto in = detail::operand_of(X, "input").sizes, out = output_sizes(in);
        detail::check_pool_io(X, Y, out, "MaxPool3d");
        const index_t cost = detail::cost_mul(detail::cost_mul(Y.shape().numel(), k_.d * k_.h), k_.w);
        parallel::parallel_for(out[0] * out[1], cost, [&](index_t nc) {
            const index_t n = nc / out[1], c = nc % out[1];
            detail::for_each_cell(out, window_of(in), [&](const std::array<index_t, 3>& o, const detail::window3& win) {
                Y(n, c, o[0], o[1], o[2]) = window_max(X, n, c, win).value;
            });
        });
    }
    /// dX for dY at input X (max_pool3d_with_indices_backward): each output's gradient goes to
    /// the element forward picked (PyTorch's rule: the first maximum in (d, h, w) order, so a
    /// window of equal values, e.g. zeros after a ReLU, sends it to its first element), summed
    /// where windows overlap.  dX is overwritten.
    template <class VX, class VDY, class VDX>
    void backward(const VX& X, const VDY& dY, const VDX& dX) const
    {
        static_assert(std::is_same_v<typename VX::layout_type, typename VDY::layout_type> &&
                          std::is_same_v<typename VX::layout_type, typename VDX::layout_type>,
                      "MaxPool3d::backward: all tensors of one call must have the same layout");
        static_assert(!std::is_const_v<typename VDX::value_type>, "MaxPool3d::backward: dX must be writable");
        const auto x = detail::operand_of(X, "input"), dy = detail::operand_of(dY, "grad_output"),
                   dx = detail::operand_of(dX, "grad_input");
        const auto out = output_sizes(x.sizes);
        detail::check_sizes(dy, out, "MaxPool3d", x.sizes);
        detail::check_sizes(dx, x.sizes, "MaxPool3d", x.sizes);
        detail::check_disjoint(dx, x);
        detail::check_disjoint(dx, dy);
        const auto in = x.sizes;
        const index_t cost = detail::cost_mul(detail::cost_mul(dY.shape().numel(), k_.d * k_.h), k_.w);
        parallel::parallel_for(in[0] * in[1], cost, [&](index_t nc) { // one (n, c) plane per task: no races
            const index_t n = nc / in[1], c = nc % in[1];
            detail::zero_plane(dX, in, n, c);
            detail::for_each_cell(out, window_of(in), [&](const std::array<index_t, 3>& o, const detail::window3& win) {
                const auto m = window_max(X, n, c, win);
                dX(n, c, m.at[0], m.at[1], m.at[2]) += dY(n, c, o[0], o[1], o[2]);
            });
        });
    }

private:
    struct max_at {
        float value;
        std::array<index_t, 3> at; // (d, h, w) of the input element chosen
    };
    /// The window of output cell o for input sizes `in`: only its part inside the input
    /// (padding never wins).  start + k <= in + p: no overflow.
    auto window_of(const std::array<index_t, 5>& in) const
    {
        return [this, in](const std::array<index_t, 3>& o) {
            detail::window3 w{};
            for (int i = 0; i < 3; ++i) {
                const index_t start = o[i] * s_[i] - p_[i];
                w.lo[i] = std::max<index_t>(start, 0);
                w.hi[i] = std::min<index_t>(start + k_[i], in[2 + i]);
            }
            return w;
        };
    }
    /// The max of a window, with ATen's rule for which element it is: the first strictly
    /// greater value in (d, h, w) order wins, a NaN always wins (the last NaN), and a window of
    /// -inf only is its first element.
    template <class VX>
    max_at window_max(const VX& X, index_t n, index_t c, const detail::window3& win) const
    {
        const auto& lo = win.lo;
        const auto& hi = win.hi;
        max_at m{-std::numeric_limits<float>::infinity(), lo};
        for (index_t d = lo[0]; d < hi[0]; ++d)
            for (index_t h = lo[1]; h < hi[1]; ++h)
                for (index_t w = lo[2]; w < hi[2]; ++w) {
                    const float v = X(n, c, d, h, w);
                    if (v > m.value || std::isnan(v)) m = {v, {d, h, w}};
                }
        return m;
    }

    size3 k_, s_, p_;
};

/// torch.nn.AdaptiveAvgPool3d(output_size): output cell i averages input
/// [floor(i*In/Out), ceil((i+1)*In/Out)) per dimension, in float as PyTorch's CPU kernel.
class AdaptiveAvgPool3d {
public:
    explicit AdaptiveAvgPool3d(size3 output_size) : o_(output_size)
    {
        if (o_.d < 0 || o_.h < 0 || o_.w < 0)
            throw error("adaptive_avg_pool3d: elements of output_size must be greater than or equal to 0 but received {" +
                        std::to_string(o_.d) + ", " + std::to_string(o_.h) + ", " + std::to_string(o_.w) + "}");
    }
    size3 output_size() const noexcept { return o_; }
    /// [N, C, output_size]; an input with an empty spatial dimension is an error (PyTorch 1.13
    /// returns NaN there; later PyTorch raises, and so does volfuse).
    std::array<index_t, 5> output_sizes(const std::array<index_t, 5>& in) const
    {
        for (int i = 2; i < 5; ++i)
            if (in[i] <= 0)
                throw error("adaptive_avg_pool3d(): Expected input to have non-zero size for non-batch dimensions, "
                            "but input has sizes " + detail::sizes_str(in) + " with dimension " + std::to_string(i) +
                            " being empty");
        for (int i = 0; i < 3; ++i) {
            index_t r = 0; // the window bounds reach O * I + O - 1
            if (!detail::mul_ok(in[2 + i], o_[i], r) || !detail::add_ok(r, o_[i], r))
                throw error("adaptive_avg_pool3d: input size " + std::to_string(in[2 + i]) + " times output_size " +
                            std::to_string(o_[i]) + " overflows a 64-bit index");
        }
        return {in[0], in[1], o_.d, o_.h, o_.w};
    }
    template <class VX, class VY>
    void forward(const VX& X, const VY& Y) const
    {
        const auto in = detail::operand_of(X, "input").sizes, out = output_sizes(in);
        detail::check_pool_io(X, Y, out, "AdaptiveAvgPool3d");
        parallel::parallel_for(out[0] * out[1], X.shape().numel(), [&](index_t nc) {
            const index_t n = nc / out[1], c = nc % out[1];
            detail::for_each_cell(out, window_of(in, out), [&](const std::array<index_t, 3>& o, const detail::window3& win) {
                float sum = 0.f;
                for (index_t d = win.lo[0]; d < win.hi[0]; ++d)
                    for (index_t h = win.lo[1]; h < win.hi[1]; ++h)
                        for (index_t w = win.lo[2]; w < win.hi[2]; ++w) sum += X(n, c, d, h, w);
                Y(n, c, o[0], o[1], o[2]) = sum / static_cast<float>(win.size());
            });
        });
    }
    /// dX (the input's sizes) for dY (adaptive_avg_pool3d_backward): each output's gradient
    /// divided by its window's size, added to every element of the window.  dX is overwritten.
    template <class VDY, class VDX>
    void backward(const VDY& dY, const VDX& dX) const
    {
        static_assert(std::is_same_v<typename VDY::layout_type, typename VDX::layout_type>,
                      "AdaptiveAvgPool3d::backward: all tensors of one call must have the same layout");
        static_assert(!std::is_const_v<typename VDX::value_type>, "AdaptiveAvgPool3d::backward: dX must be writable");
        const auto dy = detail::operand_of(dY, "grad_output"), dx = detail::operand_of(dX, "grad_input");
        const auto in = dx.sizes, out = output_sizes(in);
        detail::check_sizes(dy, out, "AdaptiveAvgPool3d", in);
        detail::check_disjoint(dx, dy);
        parallel::parallel_for(in[0] * in[1], dX.shape().numel(), [&](index_t nc) {
            const index_t n = nc / in[1], c = nc % in[1];
            detail::zero_plane(dX, in, n, c);
            detail::for_each_cell(out, window_of(in, out), [&](const std::array<index_t, 3>& o, const detail::window3& win) {
                const float g = dY(n, c, o[0], o[1], o[2]) / static_cast<float>(win.size());
                for (index_t d = win.lo[0]; d < win.hi[0]; ++d)
                    for (index_t h = win.lo[1]; h < win.hi[1]; ++h)
                        for (index_t w = win.lo[2]; w < win.hi[2]; ++w) dX(n, c, d, h, w) += g;
            });
        });
    }

private:
    /// PyTorch's adaptive windows: cell i of O over I inputs is [floor(i*I/O), ceil((i+1)*I/O)).
    static auto window_of(const std::array<index_t, 5>& in, const std::array<index_t, 5>& out)
    {
        return [in, out](const std::array<index_t, 3>& o) {
            detail::window3 w{};
            for (int i = 0; i < 3; ++i) {
                w.lo[i] = o[i] * in[2 + i] / out[2 + i];
                w.hi[i] = ((o[i] + 1) * in[2 + i] + out[2 + i] - 1) / out[2 + i];
            }
            return w;
        };
    }
    size3 o_;
};

/// torch.nn.Linear(in_features, out_features, bias): y = x W^T + b on a row-major [N, in]
/// matrix; weight stored [out][in] as PyTorch's, initialized from its distribution
/// (uniform in +-1/sqrt(in)) with a seeded generator.
class Linear {
public:
    Linear(index_t in_features, index_t out_features, bool bias = true) : in_(in_features), out_(out_features)
    {
        detail::checked_numel(std::array<index_t, 2>{out_features, in_features}); // PyTorch's messages
        weight_.resize(static_cast<std::size_t>(in_ * out_));
        if (bias) bias_.resize(static_cast<std::size_t>(out_));
        weight_grad_.assign(weight_.size(), 0.f);
        bias_grad_.assign(bias_.size(), 0.f);
        std::mt19937_64 gen(0);
        const float bound = in_ > 0 ? 1.f / std::sqrt(static_cast<float>(in_)) : 0.f;
        std::uniform_real_distribution<float> u(-bound, bound);
        for (auto& w : weight_) w = u(gen);
        for (auto& b : bias_) b = u(gen);
    }
    std::span<float> weight() noexcept { return weight_; }
    std::span<float> bias() noexcept { return bias_; }
    std::span<const float> weight() const noexcept { return weight_; }
    std::span<const float> bias() const noexcept { return bias_; }
    std::span<const float> weight_grad() const noexcept { return weight_grad_; }
    std::span<const float> bias_grad() const noexcept { return bias_grad_; }
    void zero_grad() noexcept
    {
        std::fill(weight_grad_.begin(), weight_grad_.end(), 0.f);
        std::fill(bias_grad_.begin(), bias_grad_.end(), 0.f);
    }
    /// The parameters in PyTorch's order (weight, bias), for an optimizer (nn/training.hpp).
    std::vector<parameter> parameters()
    {
        std::vector<parameter> p{{"weight", weight_, weight_grad_}};
        if (!bias_.empty()) p.push_back({"bias", bias_, bias_grad_});
        return p;
    }
    index_t in_features() const noexcept { return in_; }
    index_t out_features() const noexcept { return out_; }

    /// y[N][out] = x[N][in] W^T + b.
    void forward(std::span<const float> x, std::span<float> y, index_t N) const
    {
        const auto [nx, ny] = batch_elements(N);
        if (static_cast<index_t>(x.size()) != nx)
            throw error("mat1 and mat2 shapes cannot be multiplied (" + std::to_string(N) + "x" +
                        std::to_string(N > 0 ? static_cast<index_t>(x.size()) / N : 0) + " and " + std::to_string(in_) +
                        "x" + std::to_string(out_) + ")");
        if (static_cast<index_t>(y.size()) != ny)
            throw error("Linear: output has " + std::to_string(y.size()) + " elements, expected " + std::to_string(ny));
        if ((nx > 0 && x.data() == nullptr) || (ny > 0 && y.data() == nullptr))
            throw error("Linear: null data pointer");
        detail::check_disjoint({y.data(), ny, ny, {}, "output"}, {x.data(), nx, nx, {}, "input"});
        for (index_t n = 0; n < N; ++n)
            for (index_t o = 0; o < out_; ++o) {
                float s = 0.f;
                for (index_t i = 0; i < in_; ++i) s += x[n * in_ + i] * weight_[o * in_ + i];
                y[n * out_ + o] = bias_.empty() ? s : s + bias_[o];
            }
    }

    /// Gradients for dy[N][out] at input x[N][in]: dx = dy W (skipped when dx is empty: a
    /// first layer's input needs none), weight_grad += dy^T x and bias_grad += the column sums
    /// of dy (PyTorch's accumulation).  Each sum runs in float in index order.
    void backward(std::span<const float> x, std::span<const float> dy, std::span<float> dx, index_t N)
    {
        const auto [nx, ny] = batch_elements(N);
        if (static_cast<index_t>(x.size()) != nx)
            throw error("Linear::backward: input has " + std::to_string(x.size()) + " elements, expected " + std::to_string(nx));
        if (static_cast<index_t>(dy.size()) != ny)
            throw error("Linear::backward: grad_output has " + std::to_string(dy.size()) + " elements, expected " +
                        std::to_string(ny));
        if (!dx.empty() && static_cast<index_t>(dx.size()) != nx)
            throw error("Linear::backward: grad_input has " + std::to_string(dx.size()) + " elements, expected " +
                        std::to_string(nx) + " (or none)");
        if ((nx > 0 && x.data() == nullptr) || (ny > 0 && dy.data() == nullptr) || (!dx.empty() && dx.data() == nullptr))
            throw error("Linear::backward: null data pointer");
        if (!dx.empty()) {
            const detail::operand dxo{dx.data(), nx, nx, {}, "grad_input"};
            detail::check_disjoint(dxo, {x.data(), nx, nx, {}, "input"});
            detail::check_disjoint(dxo, {dy.data(), ny, ny, {}, "grad_output"});
        }
        if (!dx.empty())
            for (index_t n = 0; n < N; ++n)
                for (index_t i = 0; i < in_; ++i) {
                    float s = 0.f;
                    for (index_t o = 0; o < out_; ++o) s += dy[n * out_ + o] * weight_[o * in_ + i];
                    dx[n * in_ + i] = s;
                }
        parallel::parallel_for(out_, nx * out_, [&](index_t o) {
            for (index_t i = 0; i < in_; ++i) {
                float s = 0.f;
                for (index_t n = 0; n < N; ++n) s += dy[n * out_ + o] * x[n * in_ + i];
                weight_grad_[o * in_ + i] += s;
            }
            if (!bias_grad_.empty()) {
                float s = 0.f;
                for (index_t n = 0; n < N; ++n) s += dy[n * out_ + o];
                bias_grad_[o] += s;
            }
        });
    }

private:
    /// Elements of x[N][in] and y[N][out], overflow-checked.
    std::pair<index_t, index_t> batch_elements(index_t N) const
    {
        index_t nx = 0, ny = 0;
        if (N < 0 || !detail::mul_ok(N, in_, nx) || !detail::mul_ok(N, out_, ny))
            throw error("Linear: batch size " + std::to_string(N) + " is negative or overflows a 64-bit size");
        return {nx, ny};
    }

    index_t in_, out_;
    std::vector<float> weight_, bias_, weight_grad_, bias_grad_;
};

} // namespace volfuse
