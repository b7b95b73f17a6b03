// The seed's VideoActionRecognizer on volfuse, its conv blocks the types volfuse_gen generated
// from video_action_recognizer.arch (specialized kernels, registered for runtime-shaped code):
//   x [B, 3, T, H, W] -> conv1+bn1+relu -> maxpool(2) -> conv2+bn2+relu -> avgpool(1) -> fc -> [B, 400]
#pragma once

#include <span>
#include <vector>

#include "video_action_recognizer_kernels.hpp" // generated: video::conv1_t, video::conv2_t

namespace video {

namespace vf = volfuse;

struct VideoActionRecognizer {
    conv1_t block1{vf::Conv3d<conv1_spec>{}, vf::BatchNorm3d<>(64)};
    vf::MaxPool3d maxpool{2};
    conv2_t block2{vf::Conv3d<conv2_spec>{}, vf::BatchNorm3d<>(128)};
    vf::AdaptiveAvgPool3d avgpool{1};
    vf::Linear fc{128, 400};

    void train(bool mode = true)
    {
        block1.train(mode);
        block2.train(mode);
    }
    void eval() { train(false); }

    /// Logits [B, 400] for an NCDHW video batch x [B, 3, T, H, W] (as PyTorch takes it; the
    /// blocks run channels-last, so x is reordered once).
    std::vector<float> forward(std::span<const float> x, vf::index_t B, vf::index_t T, vf::index_t H, vf::index_t W)
    {
        const std::array<vf::index_t, 5> s0{B, 3, T, H, W};
        in_.resize(x.size());
        vf::reorder(vf::ncdhw_view(x.data(), s0), vf::ndhwc_view(in_.data(), s0));
        const auto s1 = block1.output_sizes(s0), s2 = maxpool.output_sizes(s1), s3 = block2.output_sizes(s2),
                   s4 = avgpool.output_sizes(s3);
        a_.resize(static_cast<std::size_t>(numel(s1)));
        b_.resize(static_cast<std::size_t>(numel(s2)));
        c_.resize(static_cast<std::size_t>(numel(s3)));
        d_.resize(static_cast<std::size_t>(numel(s4)));
        block1.forward(vf::ndhwc_view(in_.data(), s0), vf::ndhwc_view(a_.data(), s1));
        maxpool.forward(vf::ndhwc_view(a_.data(), s1), vf::ndhwc_view(b_.data(), s2));
        block2.forward(vf::ndhwc_view(b_.data(), s2), vf::ndhwc_view(c_.data(), s3));
        avgpool.forward(vf::ndhwc_view(c_.data(), s3), vf::ndhwc_view(d_.data(), s4));
        std::vector<float> logits(static_cast<std::size_t>(B * 400));
        fc.forward(d_, logits, B); // [B, 128, 1, 1, 1] channels-last is [B, 128] row-major
        return logits;
    }

private:
    static vf::index_t numel(const std::array<vf::index_t, 5>& s) { return s[0] * s[1] * s[2] * s[3] * s[4]; }
    std::vector<float> in_, a_, b_, c_, d_; // activations, reused across calls
};

} // namespace video
