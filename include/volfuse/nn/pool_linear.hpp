// The simple layers around the seed networks' conv blocks: MaxPool3d, AdaptiveAvgPool3d
// and Linear, forward only, with PyTorch's semantics for what they support (documented per
// class).  Plain loops: these layers move little data next to the convs they sit between.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../core/format.hpp"
#include "../parallel/threads.hpp"
#include "../shape/conv_geometry.hpp"
#include "../shape/view.hpp"

namespace volfuse {

namespace detail {
template <class VX, class VY>
void check_pool_io(const VX& X, const VY& Y, const std::array<index_t, 5>& want, const char* who)
{
    static_assert(std::is_same_v<typename VX::layout_type, typename VY::layout_type>,
                  "pooling: input and output must have the same layout");
    static_assert(!std::is_const_v<typename VY::value_type>, "pooling: Y must be writable");
    if (Y.sizes() != want)
        throw error(std::string(who) + ": output has shape " + sizes_str(Y.sizes()) + " but expected " +
                    sizes_str(want) + " for input " + sizes_str(X.sizes()));
}
} // namespace detail

/// torch.nn.MaxPool3d(kernel_size, stride = kernel_size, padding = 0); no dilation,
/// ceil_mode or indices.  NaN propagates as in PyTorch (a NaN in the window wins).
class MaxPool3d {
public:
    explicit MaxPool3d(size3 kernel_size, std::optional<size3> stride = std::nullopt, size3 padding = 0)
        : k_(kernel_size), s_(stride.value_or(kernel_size)), p_(padding)
    {
        for (int i = 0; i < 3; ++i) {
            if (k_[i] <= 0 || s_[i] <= 0) throw error("max_pool3d: kernel_size and stride must be greater than zero");
            if (p_[i] < 0 || 2 * p_[i] > k_[i]) throw error("pad should be smaller than or equal to half of kernel size");
        }
    }
    std::array<index_t, 5> output_sizes(const std::array<index_t, 5>& in) const noexcept
    {
        return {in[0], in[1], conv_out_extent(in[2], k_.d, s_.d, p_.d, 1), conv_out_extent(in[3], k_.h, s_.h, p_.h, 1),
                conv_out_extent(in[4], k_.w, s_.w, p_.w, 1)};
    }
    template <class VX, class VY>
    void forward(const VX& X, const VY& Y) const
    {
        const auto in = X.sizes(), out = output_sizes(in);
        if (out[2] <= 0 || out[3] <= 0 || out[4] <= 0)
            throw error("max_pool3d: output size is too small for input " + detail::sizes_str(in));
        detail::check_pool_io(X, Y, out, "MaxPool3d");
        parallel::parallel_for(out[0] * out[1], Y.shape().numel() * k_.d * k_.h * k_.w, [&](index_t nc) {
            const index_t n = nc / out[1], c = nc % out[1];
            for (index_t od = 0; od < out[2]; ++od)
                for (index_t oh = 0; oh < out[3]; ++oh)
                    for (index_t ow = 0; ow < out[4]; ++ow) {
                        float m = -std::numeric_limits<float>::infinity();
                        for (index_t kd = 0; kd < k_.d; ++kd)
                            for (index_t kh = 0; kh < k_.h; ++kh)
                                for (index_t kw = 0; kw < k_.w; ++kw) {
                                    const index_t d = od * s_.d - p_.d + kd, h = oh * s_.h - p_.h + kh,
                                                  w = ow * s_.w - p_.w + kw;
                                    if (d < 0 || d >= in[2] || h < 0 || h >= in[3] || w < 0 || w >= in[4]) continue;
                                    const float v = X(n, c, d, h, w);
                                    if (v > m || std::isnan(v)) m = v;
                                    if (std::isnan(m)) break;
                                }
                        Y(n, c, od, oh, ow) = m;
                    }
        });
    }

private:
    size3 k_, s_, p_;
};

/// torch.nn.AdaptiveAvgPool3d(output_size): output cell i averages input
/// [floor(i*In/Out), ceil((i+1)*In/Out)) per dimension, in float as PyTorch's CPU kernel.
class AdaptiveAvgPool3d {
public:
    explicit AdaptiveAvgPool3d(size3 output_size) : o_(output_size)
    {
        if (o_.d <= 0 || o_.h <= 0 || o_.w <= 0)
            throw error("adaptive_avg_pool3d: output_size must be greater than zero");
    }
    std::array<index_t, 5> output_sizes(const std::array<index_t, 5>& in) const noexcept
    {
        return {in[0], in[1], o_.d, o_.h, o_.w};
    }
    template <class VX, class VY>
    void forward(const VX& X, const VY& Y) const
    {
        const auto in = X.sizes(), out = output_sizes(in);
        detail::check_pool_io(X, Y, out, "AdaptiveAvgPool3d");
        auto start = [](index_t i, index_t I, index_t O) { return i * I / O; };
        auto end = [](index_t i, index_t I, index_t O) { return ((i + 1) * I + O - 1) / O; };
        parallel::parallel_for(out[0] * out[1], X.shape().numel(), [&](index_t nc) {
            const index_t n = nc / out[1], c = nc % out[1];
            for (index_t od = 0; od < out[2]; ++od)
                for (index_t oh = 0; oh < out[3]; ++oh)
                    for (index_t ow = 0; ow < out[4]; ++ow) {
                        const index_t d0 = start(od, in[2], out[2]), d1 = end(od, in[2], out[2]);
                        const index_t h0 = start(oh, in[3], out[3]), h1 = end(oh, in[3], out[3]);
                        const index_t w0 = start(ow, in[4], out[4]), w1 = end(ow, in[4], out[4]);
                        float sum = 0.f;
                        for (index_t d = d0; d < d1; ++d)
                            for (index_t h = h0; h < h1; ++h)
                                for (index_t w = w0; w < w1; ++w) sum += X(n, c, d, h, w);
                        Y(n, c, od, oh, ow) = sum / static_cast<float>((d1 - d0) * (h1 - h0) * (w1 - w0));
                    }
        });
    }

private:
    size3 o_;
};

/// torch.nn.Linear(in_features, out_features, bias): y = x W^T + b on a row-major [N, in]
/// matrix; weight stored [out][in] as PyTorch's, initialized from its distribution
/// (uniform in +-1/sqrt(in)) with a seeded generator.
class Linear {
public:
    Linear(index_t in_features, index_t out_features, bool bias = true) : in_(in_features), out_(out_features)
    {
        if (in_features < 0 || out_features < 0)
            throw error("Trying to create tensor with negative dimension " + std::to_string(std::min(in_features, out_features)) +
                        ": [" + std::to_string(out_features) + ", " + std::to_string(in_features) + "]");
        weight_.resize(static_cast<std::size_t>(in_ * out_));
        if (bias) bias_.resize(static_cast<std::size_t>(out_));
        std::mt19937_64 gen(0);
        const float bound = in_ > 0 ? 1.f / std::sqrt(static_cast<float>(in_)) : 0.f;
        std::uniform_real_distribution<float> u(-bound, bound);
        for (auto& w : weight_) w = u(gen);
        for (auto& b : bias_) b = u(gen);
    }
    std::span<float> weight() noexcept { return weight_; }
    std::span<float> bias() noexcept { return bias_; }
    index_t in_features() const noexcept { return in_; }
    index_t out_features() const noexcept { return out_; }

    /// y[N][out] = x[N][in] W^T + b.
    void forward(std::span<const float> x, std::span<float> y, index_t N) const
    {
        if (static_cast<index_t>(x.size()) != N * in_)
            throw error("mat1 and mat2 shapes cannot be multiplied (" + std::to_string(N) + "x" +
                        std::to_string(N > 0 ? static_cast<index_t>(x.size()) / N : 0) + " and " + std::to_string(in_) +
                        "x" + std::to_string(out_) + ")");
        if (static_cast<index_t>(y.size()) != N * out_)
            throw error("Linear: output has " + std::to_string(y.size()) + " elements, expected " +
                        std::to_string(N * out_));
        for (index_t n = 0; n < N; ++n)
            for (index_t o = 0; o < out_; ++o) {
                float s = 0.f;
                for (index_t i = 0; i < in_; ++i) s += x[n * in_ + i] * weight_[o * in_ + i];
                y[n * out_ + o] = bias_.empty() ? s : s + bias_[o];
            }
    }

private:
    index_t in_, out_;
    std::vector<float> weight_, bias_;
};

} // namespace volfuse
