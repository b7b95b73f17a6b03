// The seed's VideoActionRecognizer on volfuse, its conv blocks the types volfuse_gen generated
// from video_action_recognizer.arch (specialized conv and BatchNorm3d kernels):
//   x [B, 3, T, H, W] -> conv1+bn1+relu -> maxpool(2) -> conv2+bn2+relu -> avgpool(1) -> fc -> [B, 400]
// forward, backward (autograd's chain, by hand) and parameters() named as the PyTorch model's
// state_dict, so a training step is zero_grad, forward, loss, backward, SGD step
// (train_seed_networks.cpp).
#pragma once

#include <span>
#include <vector>

#include "seed_parameters.hpp"
#include "video_action_recognizer_kernels.hpp" // generated: video::conv1_t, video::conv2_t

namespace video {

namespace vf = volfuse;

struct VideoActionRecognizer {
    static constexpr vf::index_t classes = 400;
    conv1_t block1{}; // Conv3d(3, 64, 7, stride=2, padding=3) -> BatchNorm3d(64) -> ReLU
    vf::MaxPool3d maxpool{2};
    conv2_t block2{}; // Conv3d(64, 128, 3, padding=1) -> BatchNorm3d(128) -> ReLU
    vf::AdaptiveAvgPool3d avgpool{1};
    vf::Linear fc{128, classes};

    void train(bool mode = true)
    {
        block1.train(mode);
        block2.train(mode);
    }
    void eval() { train(false); }

    /// Logits [B, 400] for an NCDHW video batch x [B, 3, T, H, W] (as PyTorch takes it; the
    /// blocks run channels-last, so x is reordered once).  Keeps what backward needs.
    std::vector<float> forward(std::span<const float> x, vf::index_t B, vf::index_t T, vf::index_t H, vf::index_t W)
    {
        s0_ = {B, 3, T, H, W};
        in_.resize(x.size());
        vf::reorder(vf::ncdhw_view(x.data(), s0_), vf::ndhwc_view(in_.data(), s0_));
        s1_ = block1.output_sizes(s0_), s2_ = maxpool.output_sizes(s1_), s3_ = block2.output_sizes(s2_),
        s4_ = avgpool.output_sizes(s3_);
        a_.resize(numel(s1_)), b_.resize(numel(s2_)), c_.resize(numel(s3_)), d_.resize(numel(s4_));
        block1.forward(vf::ndhwc_view(in_.data(), s0_), vf::ndhwc_view(a_.data(), s1_));
        maxpool.forward(vf::ndhwc_view(a_.data(), s1_), vf::ndhwc_view(b_.data(), s2_));
        block2.forward(vf::ndhwc_view(b_.data(), s2_), vf::ndhwc_view(c_.data(), s3_));
        avgpool.forward(vf::ndhwc_view(c_.data(), s3_), vf::ndhwc_view(d_.data(), s4_));
        std::vector<float> logits(static_cast<std::size_t>(B * classes));
        fc.forward(d_, logits, B); // [B, 128, 1, 1, 1] channels-last is torch.flatten's [B, 128]
        return logits;
    }

    /// Gradients of the last forward for dlogits [B, 400]: accumulates every parameter's grad
    /// (the input needs none: block1 skips its grad-input convolution, as autograd does).
    void backward(std::span<const float> dlogits)
    {
        const vf::index_t B = s0_[0];
        dd_.resize(d_.size()), dc_.resize(c_.size()), db_.resize(b_.size()), da_.resize(a_.size());
        fc.backward(d_, dlogits, dd_, B);
        avgpool.backward(vf::ndhwc_view(dd_.data(), s4_), vf::ndhwc_view(dc_.data(), s3_));
        block2.backward(vf::ndhwc_view(b_.data(), s2_), vf::ndhwc_view(dc_.data(), s3_), vf::ndhwc_view(db_.data(), s2_));
        maxpool.backward(vf::ndhwc_view(a_.data(), s1_), vf::ndhwc_view(db_.data(), s2_), vf::ndhwc_view(da_.data(), s1_));
        block1.backward(vf::ndhwc_view(in_.data(), s0_), vf::ndhwc_view(da_.data(), s1_));
    }

    /// Every parameter, named as in the PyTorch model's state_dict ("conv1.weight", "bn1.bias", ...).
    std::vector<vf::parameter> parameters()
    {
        return seed::parameters(block1, block2, fc);
    }

private:
    using sizes = std::array<vf::index_t, 5>;
    static std::size_t numel(const sizes& s) { return static_cast<std::size_t>(s[0] * s[1] * s[2] * s[3] * s[4]); }
    sizes s0_{}, s1_{}, s2_{}, s3_{}, s4_{};
    std::vector<float> in_, a_, b_, c_, d_;  // activations, reused across calls
    std::vector<float> da_, db_, dc_, dd_;   // their gradients
};

} // namespace video
