// Trains the seed's two networks in C++ with volfuse: each step is zero_grad, forward,
// CrossEntropyLoss, backward, SGD step (torch.optim.SGD with momentum and weight decay),
// as a PyTorch training loop does.  MedicalImageAnalyzer runs at the seed's size (its
// Linear(64^4, 2) fixes the input at [B, 1, 64, 64, 64]); VideoActionRecognizer's
// AdaptiveAvgPool3d takes any input size (the default is a reduced video, 8 frames of 32x32).
//
//   train_seed_networks [--steps N] [--video B,T,H,W] [--medical B] [--only video|medical] [--dump DIR]
//
// --dump writes DIR/<network>.bin: the input, targets, hyperparameters and initial parameters,
// each step's loss, and after the last step every gradient, parameter and BatchNorm buffer
// (tests/golden/seed_training.py replays the same steps in PyTorch and compares them all).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>

#include "medical_image_analyzer.hpp"
#include "video_action_recognizer.hpp"

namespace {

namespace vf = volfuse;

struct options {
    int steps = 2;
    vf::index_t video[4] = {2, 8, 32, 32}; // B, T, H, W
    vf::index_t medical_batch = 2;
    std::string only, dump;
};
constexpr double momentum = 0.9, weight_decay = 1e-4;
// The medical fc sums 16.8M features: a step of lr moves its logits by about lr * 4e6, so its
// learning rate is far smaller than the video network's.
constexpr double video_lr = 0.05, medical_lr = 2e-7;

/// Named float arrays, as tests/golden/seed_training.py reads them: u32 name length, the name,
/// u64 count, count float32 values.
class dump_file {
public:
    explicit dump_file(const std::string& path) : out_(path, std::ios::binary)
    {
        if (!path.empty() && !out_) throw vf::error("cannot write " + path);
    }
    void put(const std::string& name, std::span<const float> v)
    {
        if (!out_.is_open()) return;
        const auto n = static_cast<std::uint32_t>(name.size());
        const auto c = static_cast<std::uint64_t>(v.size());
        out_.write(reinterpret_cast<const char*>(&n), sizeof n).write(name.data(), n);
        out_.write(reinterpret_cast<const char*>(&c), sizeof c);
        out_.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(c * sizeof(float)));
    }
    void put(const std::string& name, double v)
    {
        const float f = static_cast<float>(v);
        put(name, std::span<const float>(&f, 1));
    }

private:
    std::ofstream out_;
};

template <class Block>
void put_buffers(dump_file& f, const std::string& name, const Block& block)
{
    f.put("buffer/" + name + ".running_mean", block.bn().running_mean());
    f.put("buffer/" + name + ".running_var", block.bn().running_var());
    f.put("buffer/" + name + ".num_batches_tracked", static_cast<double>(block.bn().num_batches_tracked()));
}

/// Runs `steps` SGD steps of `net` on (x, target); forward(x) returns the logits.
template <class Net, class Forward>
void train(const char* title, Net& net, std::span<const float> x, const std::array<vf::index_t, 5>& shape,
           const std::vector<std::int64_t>& target, Forward forward, double lr, const options& o,
           const std::string& dump_path)
{
    const vf::index_t B = shape[0];
    dump_file f(dump_path);
    f.put("x", x);
    const std::vector<float> dims(shape.begin(), shape.end());
    f.put("input_shape", dims);
    std::vector<float> t(target.begin(), target.end());
    f.put("target", t);
    f.put("lr", lr), f.put("momentum", momentum), f.put("weight_decay", weight_decay), f.put("steps", o.steps);
    for (const vf::parameter& p : net.parameters()) f.put("init/" + p.name, p.value);

    net.train();
    vf::SGD sgd(net.parameters(), lr, momentum, /*dampening*/ 0.0, weight_decay);
    vf::CrossEntropyLoss loss;
    std::vector<float> losses;
    for (int step = 0; step < o.steps; ++step) {
        sgd.zero_grad();
        const std::vector<float> logits = forward(x);
        const vf::index_t K = static_cast<vf::index_t>(logits.size()) / B;
        losses.push_back(loss.forward(logits, target, B, K));
        std::vector<float> dlogits(logits.size());
        loss.backward(dlogits);
        net.backward(dlogits);
        if (step + 1 == o.steps)
            for (const vf::parameter& p : net.parameters()) f.put("grad/" + p.name, p.grad);
        sgd.step();
        std::printf("%s step %d: loss %.6f\n", title, step + 1, losses.back());
    }
    f.put("loss", losses);
    for (const vf::parameter& p : net.parameters()) f.put("param/" + p.name, p.value);
    put_buffers(f, "bn1", net.block1);
    put_buffers(f, "bn2", net.block2);
    std::printf("%s: block1 %s; its BatchNorm3d %s\n", title, net.block1.conv().kernel_choice().why.c_str(),
                net.block1.bn().kernel_choice().why.c_str());
}

std::vector<float> randn(std::size_t n, unsigned seed)
{
    std::vector<float> v(n);
    std::mt19937 gen(seed);
    std::normal_distribution<float> d;
    for (auto& e : v) e = d(gen);
    return v;
}

options parse(int argc, char** argv)
{
    options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
        if (a == "--steps" && v) o.steps = std::atoi(argv[++i]);
        else if (a == "--video" && v && std::sscanf(argv[++i], "%ld,%ld,%ld,%ld", &o.video[0], &o.video[1], &o.video[2], &o.video[3]) == 4) {}
        else if (a == "--medical" && v) o.medical_batch = std::atol(argv[++i]);
        else if (a == "--only" && v) o.only = argv[++i];
        else if (a == "--dump" && v) o.dump = argv[++i];
        else {
            std::fprintf(stderr, "usage: %s [--steps N] [--video B,T,H,W] [--medical B] [--only video|medical] [--dump DIR]\n",
                         argv[0]);
            std::exit(a == "--help" ? 0 : 2);
        }
    }
    if (o.steps < 1 || o.medical_batch < 1) {
        std::fprintf(stderr, "--steps and --medical take a positive number\n");
        std::exit(2);
    }
    return o;
}

} // namespace

int main(int argc, char** argv)
{
    const options o = parse(argc, argv);
    const auto path = [&](const char* name) { return o.dump.empty() ? std::string() : o.dump + "/" + name + ".bin"; };
    try {
        if (o.only.empty() || o.only == "video") {
            const auto [B, T, H, W] = o.video;
            const auto x = randn(static_cast<std::size_t>(B * 3 * T * H * W), 1);
            std::vector<std::int64_t> target(static_cast<std::size_t>(B));
            for (vf::index_t n = 0; n < B; ++n) target[n] = (7 * n + 3) % video::VideoActionRecognizer::classes;
            video::VideoActionRecognizer net;
            train("VideoActionRecognizer", net, x, {B, 3, T, H, W}, target,
                  [&](std::span<const float> in) { return net.forward(in, B, T, H, W); }, video_lr, o, path("video"));
        }
        if (o.only.empty() || o.only == "medical") {
            const vf::index_t B = o.medical_batch, s = medical::MedicalImageAnalyzer::side;
            const auto x = randn(static_cast<std::size_t>(B * s * s * s), 2);
            std::vector<std::int64_t> target(static_cast<std::size_t>(B));
            for (vf::index_t n = 0; n < B; ++n) target[n] = n % 2;
            medical::MedicalImageAnalyzer net;
            train("MedicalImageAnalyzer", net, x, {B, 1, s, s, s}, target, [&](std::span<const float> in) { return net.forward(in, B); },
                  medical_lr, o, path("medical"));
        }
    } catch (const vf::error& e) {
        std::fprintf(stderr, "volfuse error: %s\n", e.what());
        return 1;
    }
}
