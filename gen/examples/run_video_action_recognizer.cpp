// The seed's VideoActionRecognizer end to end on a reduced input ([2, 3, 8, 32, 32]):
// a training forward (batch statistics, running statistics updated), then an eval forward,
// printing the first logits and which kernels the blocks ran.
#include <cstdio>
#include <random>

#include "video_action_recognizer.hpp"

int main()
{
    const volfuse::index_t B = 2, T = 8, H = 32, W = 32;
    std::vector<float> x(static_cast<std::size_t>(B * 3 * T * H * W));
    std::mt19937 gen(0);
    std::normal_distribution<float> randn;
    for (auto& v : x) v = randn(gen);
    video::VideoActionRecognizer model;
    model.train();
    const auto train_logits = model.forward(x, B, T, H, W);
    model.eval();
    const auto eval_logits = model.forward(x, B, T, H, W);
    std::printf("train logits[0..3]: %g %g %g\neval  logits[0..3]: %g %g %g\n", train_logits[0], train_logits[1],
                train_logits[2], eval_logits[0], eval_logits[1], eval_logits[2]);
    std::printf("block1: %s\nblock2: %s\n", model.block1.conv().kernel_choice().why.c_str(),
                model.block2.conv().kernel_choice().why.c_str());
}
