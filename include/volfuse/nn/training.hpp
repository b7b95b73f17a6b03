// What a training step needs around the layers: torch.flatten(x, 1) for any layout and its
// gradient, torch.nn.CrossEntropyLoss, and torch.optim.SGD over modules' parameters().
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "../core/checks.hpp"
#include "../core/error.hpp"
#include "../shape/view.hpp"
#include "parameter.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

namespace detail {
/// Calls f(n, c, d, h, w, i) for every element of sizes s in NCDHW order (i: its row-major index).
template <class F>
void for_each_ncdhw(const std::array<index_t, 5>& s, F f)
{
    index_t i = 0;
    for (index_t n = 0; n < s[0]; ++n)
        for (index_t c = 0; c < s[1]; ++c)
            for (index_t d = 0; d < s[2]; ++d)
                for (index_t h = 0; h < s[3]; ++h)
                    for (index_t w = 0; w < s[4]; ++w) f(n, c, d, h, w, i++);
}
} // namespace detail

/// torch.flatten(X, 1) into rows[N][C*D*H*W] in PyTorch's (c, d, h, w) order, whatever X's
/// layout (an NDHWC view flattens as the NCDHW tensor it stands for, as channels_last_3d does).
template <class V>
void flatten(const V& X, std::span<float> rows)
{
    const auto x = detail::operand_of(X, "input");
    if (static_cast<index_t>(rows.size()) != x.numel)
        throw error("flatten: output has " + std::to_string(rows.size()) + " elements, the input " +
                    std::to_string(x.numel));
    if (x.numel > 0 && rows.data() == nullptr) throw error("flatten: output data pointer is null");
    detail::check_disjoint({rows.data(), x.numel, x.numel, x.sizes, "output"}, x);
    detail::for_each_ncdhw(x.sizes, [&](index_t n, index_t c, index_t d, index_t h, index_t w, index_t i) {
        rows[static_cast<std::size_t>(i)] = X(n, c, d, h, w);
    });
}

/// flatten's gradient: rows[N][C*D*H*W] (PyTorch's order) back into dX's layout.
template <class V>
void unflatten(std::span<const float> rows, const V& dX)
{
    static_assert(!std::is_const_v<typename V::value_type>, "unflatten: dX must be writable");
    const auto dx = detail::operand_of(dX, "grad_input");
    if (static_cast<index_t>(rows.size()) != dx.numel)
        throw error("unflatten: input has " + std::to_string(rows.size()) + " elements, grad_input " +
                    std::to_string(dx.numel));
    if (dx.numel > 0 && rows.data() == nullptr) throw error("unflatten: input data pointer is null");
    detail::check_disjoint(dx, {rows.data(), dx.numel, dx.numel, dx.sizes, "input"});
    detail::for_each_ncdhw(dx.sizes, [&](index_t n, index_t c, index_t d, index_t h, index_t w, index_t i) {
        dX(n, c, d, h, w) = rows[static_cast<std::size_t>(i)];
    });
}

/// torch.nn.CrossEntropyLoss(reduction='mean' or 'sum', ignore_index=-100) on logits[N][K] and
/// class targets: log-softmax per row (max-shifted, in float as PyTorch's CPU kernel), the
/// negative log-likelihood of the target, averaged over the rows not ignored.
class CrossEntropyLoss {
public:
    enum class reduction { mean, sum };
    explicit CrossEntropyLoss(reduction r = reduction::mean, std::int64_t ignore_index = -100)
        : r_(r), ignore_(ignore_index)
    {
    }

    /// The loss; remembers what backward needs (the softmax of each row).
    float forward(std::span<const float> logits, std::span<const std::int64_t> target, index_t N, index_t K)
    {
        check(logits, target, N, K);
        std::vector<float> p(logits.size());
        double total = 0.0; // PyTorch sums the per-row losses in its accumulate type (double on CPU for mean)
        index_t counted = 0;
        for (index_t n = 0; n < N; ++n) {
            const float* z = logits.data() + n * K;
            float m = -std::numeric_limits<float>::infinity();
            for (index_t k = 0; k < K; ++k) m = std::max(m, z[k]);
            float sum = 0.f;
            for (index_t k = 0; k < K; ++k) sum += std::exp(z[k] - m);
            const float lse = std::log(sum);
            for (index_t k = 0; k < K; ++k) p[static_cast<std::size_t>(n * K + k)] = std::exp(z[k] - m - lse);
            if (target[static_cast<std::size_t>(n)] == ignore_) continue;
            total += -static_cast<double>(z[target[static_cast<std::size_t>(n)]] - m - lse);
            ++counted;
        }
        probs_ = std::move(p);
        target_.assign(target.begin(), target.end());
        n_ = N;
        k_ = K;
        counted_ = counted;
        if (r_ == reduction::sum) return static_cast<float>(total);
        return counted > 0 ? static_cast<float>(total / static_cast<double>(counted))
                           : std::numeric_limits<float>::quiet_NaN(); // PyTorch: 0/0
    }
    /// dlogits = (softmax - onehot(target)) * grad / count (mean) for the last forward.
    void backward(std::span<float> dlogits, float grad = 1.f) const
    {
        if (static_cast<index_t>(dlogits.size()) != n_ * k_)
            throw error("CrossEntropyLoss::backward: grad has " + std::to_string(dlogits.size()) +
                        " elements, the last forward's logits " + std::to_string(n_ * k_));
        const float scale = r_ == reduction::mean ? grad / static_cast<float>(counted_) : grad;
        for (index_t n = 0; n < n_; ++n)
            for (index_t k = 0; k < k_; ++k) {
                const std::size_t i = static_cast<std::size_t>(n * k_ + k);
                const std::int64_t t = target_[static_cast<std::size_t>(n)];
                dlogits[i] = t == ignore_ ? 0.f : (probs_[i] - (k == t ? 1.f : 0.f)) * scale;
            }
    }

private:
    void check(std::span<const float> logits, std::span<const std::int64_t> target, index_t N, index_t K) const
    {
        index_t nk = 0;
        if (N < 0 || K <= 0 || !detail::mul_ok(N, K, nk))
            throw error("CrossEntropyLoss: expected N >= 0 rows of K > 0 classes, got N=" + std::to_string(N) +
                        ", K=" + std::to_string(K));
        if (static_cast<index_t>(logits.size()) != nk)
            throw error("CrossEntropyLoss: input has " + std::to_string(logits.size()) + " elements, expected " +
                        std::to_string(N) + "x" + std::to_string(K));
        if (static_cast<index_t>(target.size()) != N)
            throw error("Expected input batch_size (" + std::to_string(N) + ") to match target batch_size (" +
                        std::to_string(target.size()) + ").");
        for (std::int64_t t : target)
            if (t != ignore_ && (t < 0 || t >= K)) throw error("Target " + std::to_string(t) + " is out of bounds.");
    }

    reduction r_;
    std::int64_t ignore_;
    std::vector<float> probs_;
    std::vector<std::int64_t> target_;
    index_t n_ = 0, k_ = 0, counted_ = 0;
};

/// torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov) over parameters
/// from modules' parameters(): step() updates the values from their grads with PyTorch's
/// formula (in float, its order), zero_grad() clears the grads.
class SGD {
public:
    SGD(std::vector<parameter> params, double lr, double momentum = 0.0, double dampening = 0.0,
        double weight_decay = 0.0, bool nesterov = false)
        : params_(std::move(params)), lr_(lr), momentum_(momentum), dampening_(dampening), wd_(weight_decay),
          nesterov_(nesterov)
    {
        if (lr < 0.0) throw error("Invalid learning rate: " + std::to_string(lr));
        if (momentum < 0.0) throw error("Invalid momentum value: " + std::to_string(momentum));
        if (weight_decay < 0.0) throw error("Invalid weight_decay value: " + std::to_string(weight_decay));
        if (nesterov && (momentum <= 0.0 || dampening != 0.0))
            throw error("Nesterov momentum requires a momentum and zero dampening");
        for (const parameter& p : params_)
            if (p.value.size() != p.grad.size())
                throw error("SGD: parameter " + p.name + " has " + std::to_string(p.value.size()) + " values but " +
                            std::to_string(p.grad.size()) + " grads");
        buf_.resize(params_.size());
    }
    void step()
    {
        const float lr = static_cast<float>(lr_), mom = static_cast<float>(momentum_),
                    damp = static_cast<float>(dampening_), wd = static_cast<float>(wd_);
        for (std::size_t j = 0; j < params_.size(); ++j) {
            const parameter& p = params_[j];
            std::vector<float>& buf = buf_[j];
            const bool first = buf.empty();
            if (mom != 0.f && first) buf.resize(p.value.size());
            for (std::size_t i = 0; i < p.value.size(); ++i) {
                float d = p.grad[i];
                if (wd != 0.f) d = d + wd * p.value[i];
                if (mom != 0.f) {
                    buf[i] = first ? d : mom * buf[i] + (1.f - damp) * d;
                    d = nesterov_ ? d + mom * buf[i] : buf[i];
                }
                p.value[i] = p.value[i] - lr * d;
            }
        }
    }
    void zero_grad() noexcept
    {
        for (const parameter& p : params_) std::fill(p.grad.begin(), p.grad.end(), 0.f);
    }
    const std::vector<parameter>& params() const noexcept { return params_; }

private:
    std::vector<parameter> params_;
    double lr_, momentum_, dampening_, wd_;
    bool nesterov_;
    std::vector<std::vector<float>> buf_; // momentum buffers, created at the first step (as PyTorch's)
};

} // namespace volfuse
