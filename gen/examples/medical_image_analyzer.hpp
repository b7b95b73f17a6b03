// The seed's MedicalImageAnalyzer on volfuse, its blocks the types volfuse_gen generated from
// medical_image_analyzer.arch:
//   x [B, 1, 64, 64, 64] -> conv1+bn1+relu -> conv2+bn2+relu -> view(B, -1) -> fc -> [B, 2]
// with fc = Linear(64*64*64*64, 2) as in the seed (16.8M inputs, 33.6M weights).  NCDHW
// throughout, so x.view(B, -1) is the blocks' output memory as it is (torch.flatten's order).
#pragma once

#include <span>
#include <vector>

#include "seed_parameters.hpp"
#include "medical_image_analyzer_kernels.hpp" // generated: medical::conv1_t, medical::conv2_t

namespace medical {

namespace vf = volfuse;

struct MedicalImageAnalyzer {
    static constexpr vf::index_t side = 64, classes = 2;
    conv1_t block1{}; // Conv3d(1, 32, 3, padding=1) -> BatchNorm3d(32) -> ReLU
    conv2_t block2{}; // Conv3d(32, 64, 3, padding=1) -> BatchNorm3d(64) -> ReLU
    vf::Linear fc{64 * side * side * side, classes};

    void train(bool mode = true)
    {
        block1.train(mode);
        block2.train(mode);
    }
    void eval() { train(false); }

    /// Logits [B, 2] for CT volumes x [B, 1, 64, 64, 64] (NCDHW).  Keeps what backward needs.
    std::vector<float> forward(std::span<const float> x, vf::index_t B)
    {
        s0_ = {B, 1, side, side, side};
        if (x.size() != numel(s0_)) throw vf::error("MedicalImageAnalyzer: x must be [B, 1, 64, 64, 64]");
        x_ = x;
        s1_ = block1.output_sizes(s0_), s2_ = block2.output_sizes(s1_);
        a_.resize(numel(s1_)), c_.resize(numel(s2_));
        block1.forward(vf::ncdhw_view(x.data(), s0_), vf::ncdhw_view(a_.data(), s1_));
        block2.forward(vf::ncdhw_view(a_.data(), s1_), vf::ncdhw_view(c_.data(), s2_));
        std::vector<float> logits(static_cast<std::size_t>(B * classes));
        fc.forward(c_, logits, B); // contiguous NCDHW [B, 64, 64, 64, 64] is x.view(B, -1)
        return logits;
    }

    /// Gradients of the last forward for dlogits [B, 2]: accumulates every parameter's grad.
    void backward(std::span<const float> dlogits)
    {
        const vf::index_t B = s0_[0];
        dc_.resize(c_.size()), da_.resize(a_.size());
        fc.backward(c_, dlogits, dc_, B);
        block2.backward(vf::ncdhw_view(a_.data(), s1_), vf::ncdhw_view(dc_.data(), s2_), vf::ncdhw_view(da_.data(), s1_));
        block1.backward(vf::ncdhw_view(x_.data(), s0_), vf::ncdhw_view(da_.data(), s1_));
    }

    /// Every parameter, named as in the PyTorch model's state_dict.
    std::vector<vf::parameter> parameters()
    {
        return seed::parameters(block1, block2, fc);
    }

private:
    using sizes = std::array<vf::index_t, 5>;
    static std::size_t numel(const sizes& s) { return static_cast<std::size_t>(s[0] * s[1] * s[2] * s[3] * s[4]); }
    sizes s0_{}, s1_{}, s2_{};
    std::span<const float> x_;          // the caller's input (block1's backward reads it)
    std::vector<float> a_, c_, da_, dc_; // activations and their gradients
};

} // namespace medical
