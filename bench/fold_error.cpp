// How far the fused block is from the unfused volfuse chain (Conv3d::forward, then
// BatchNorm3d::forward with ReLU), per seed layer configuration (input [2, C, 8, 12, 12],
// stride 1, random weights, running statistics and BN parameters): training (moments from the
// conv's epilogue vs two-pass statistics) and eval (BN folded into the conv vs unfolded).
// Prints max |fused - unfused|, that as a fraction of max|y|, the largest relative difference
// among outputs with |y| > 1e-3, and how many outputs differ.  docs/conv.md quotes it.
#include <cmath>
#include <cstdio>
#include <random>
#include <tuple>
#include <vector>

#include <volfuse/volfuse.hpp>

namespace vf = volfuse;
using vf::index_t;

int main()
{
    std::mt19937 gen(1);
    std::normal_distribution<float> randn;
    for (auto [in, out, k] : {std::tuple{3, 64, 7}, {64, 128, 3}, {32, 64, 3}, {1, 32, 3}}) {
        const index_t N = 2, D = 8, H = 12, W = 12;
        std::vector<float> x(static_cast<std::size_t>(N * in * D * H * W));
        for (auto& v : x) v = randn(gen);
        for (const bool train : {true, false}) {
            vf::Conv3d<> conv(in, out, k, 1, k / 2);
            vf::BatchNorm3d<> bn(out);
            for (auto& v : bn.running_var()) v = 0.5f + 2 * std::abs(randn(gen));
            for (auto& v : bn.running_mean()) v = 0.3f * randn(gen);
            for (auto& v : bn.weight()) v = 1 + 0.3f * randn(gen);
            for (auto& v : bn.bias()) v = 0.3f * randn(gen);
            vf::ConvBnReLU3d<> block{vf::Conv3d<>(conv), vf::BatchNorm3d<>(bn)};  // copies of the parts
            block.train(train);
            bn.train(train);
            const auto ys = block.output_sizes({N, in, D, H, W});
            const index_t n = ys[0] * ys[1] * ys[2] * ys[3] * ys[4];
            std::vector<float> z(static_cast<std::size_t>(n)), unfused(z.size()), fused(z.size());
            const auto X = vf::ndhwc_view(x.data(), N, in, D, H, W);
            conv.forward(X, vf::ndhwc_view(z.data(), ys));
            bn.forward(vf::ndhwc_view(z.data(), ys), vf::ndhwc_view(unfused.data(), ys), vf::relu);
            block.forward(X, vf::ndhwc_view(fused.data(), ys));
            double worst = 0, scale = 0, worst_rel = 0;
            index_t differ = 0;
            for (index_t i = 0; i < n; ++i) {
                const double d = std::abs(static_cast<double>(unfused[i]) - fused[i]);
                worst = std::max(worst, d);
                scale = std::max(scale, static_cast<double>(std::abs(unfused[i])));
                differ += d != 0;
                if (std::abs(unfused[i]) > 1e-3) worst_rel = std::max(worst_rel, d / std::abs(unfused[i]));
            }
            std::printf("Conv3d(%d, %d, %d) %s: max |fused - unfused| %.3g (max|y| %.3g, %.3g of it), "
                        "max relative (|y| > 1e-3) %.3g, %ld of %ld outputs differ\n",
                        in, out, k, train ? "train" : "eval ", worst, scale, worst / scale, worst_rel,
                        static_cast<long>(differ), static_cast<long>(n));
        }
    }
}
