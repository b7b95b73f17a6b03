// The seed's VideoActionRecognizer end to end (gen/examples/: generated specialized blocks,
// MaxPool3d, AdaptiveAvgPool3d, Linear) against PyTorch 1.13's model with the same weights
// (tests/golden/video_action_recognizer.txt, make_e2e_golden.py): a training forward (logits
// and the running statistics it leaves), then an eval forward.
// Tolerance, norm-wise: each stage's float sums (conv1: K = 3*343, conv2: 64*27, fc: 128
// products) are within (K + 2) * 2^-24 of exact relative to their terms, BN renormalizes, and
// both implementations err that way: max |ours - torch| <= 4 * (K1 + K2 + K3) * 2^-24 * max|torch|.
#include <fstream>
#include <sstream>

#include "support.hpp"
#include "video_action_recognizer.hpp"

namespace {

std::vector<float> pattern(index_t n, std::int64_t a, std::int64_t b, std::int64_t m, std::int64_t center, double scale)
{
    std::vector<float> v(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) v[i] = static_cast<float>(static_cast<double>((i * a + b) % m - center) / scale);
    return v;
}
void fill(std::span<float> dst, const std::vector<float>& src)
{
    REQUIRE(dst.size() == src.size());
    std::copy(src.begin(), src.end(), dst.begin());
}

std::map<std::string, std::vector<float>> load_golden()
{
    std::ifstream in(VOLFUSE_GOLDEN_DIR "/video_action_recognizer.txt");
    REQUIRE(in.good());
    std::map<std::string, std::vector<float>> out;
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream s(line);
        std::string name;
        std::size_t n;
        s >> name >> n;
        std::vector<float> v(n);
        for (auto& x : v) {
            std::uint32_t bits;
            s >> std::hex >> bits;
            std::memcpy(&x, &bits, 4);
        }
        out[name] = v;
    }
    return out;
}

double max_abs(const std::vector<float>& v)
{
    double m = 0;
    for (float x : v) m = std::max(m, static_cast<double>(std::abs(x)));
    return m;
}
bool near(std::span<const float> got, const std::vector<float>& want, double tol)
{
    if (got.size() != want.size()) return false;
    const double scale = max_abs(want);
    for (std::size_t i = 0; i < got.size(); ++i)
        if (!(std::abs(static_cast<double>(got[i]) - want[i]) <= tol * scale)) return false;
    return true;
}

} // namespace

TEST_CASE("VideoActionRecognizer matches PyTorch, training then eval", "[e2e][golden]")
{
    const auto golden = load_golden();
    video::VideoActionRecognizer m;
    auto set_block = [](auto& block) {
        auto& conv = block.conv();
        fill(conv.weight(), pattern(static_cast<index_t>(conv.weight().size()), 104729, 7, 263, 131, 4096.0));
        fill(conv.bias(), pattern(static_cast<index_t>(conv.bias().size()), 31, 5, 17, 8, 16.0));
        const index_t c = block.bn().num_features();
        auto gamma = pattern(c, 17, 3, 13, 6, 8.0);
        for (auto& g : gamma) g += 1.f;
        fill(block.bn().weight(), gamma);
        fill(block.bn().bias(), pattern(c, 23, 1, 11, 5, 16.0));
    };
    set_block(m.block1);
    set_block(m.block2);
    fill(m.fc.weight(), pattern(400 * 128, 7919, 11, 251, 125, 512.0));
    fill(m.fc.bias(), pattern(400, 13, 3, 19, 9, 64.0));
    const auto x = pattern(2 * 3 * 8 * 32 * 32, 7919, 13, 257, 128, 128.0);
    const double tol = 4 * (3 * 343 + 64 * 27 + 128) * 0x1p-24;

    m.train();
    const auto train = m.forward(x, 2, 8, 32, 32);
    CHECK(near(train, golden.at("train_logits"), tol));
    CHECK(near(m.block1.bn().running_mean(), golden.at("bn1_running_mean"), tol));
    CHECK(near(m.block1.bn().running_var(), golden.at("bn1_running_var"), tol));
    CHECK(near(m.block2.bn().running_mean(), golden.at("bn2_running_mean"), tol));
    CHECK(near(m.block2.bn().running_var(), golden.at("bn2_running_var"), tol));
    m.eval();
    const auto eval = m.forward(x, 2, 8, 32, 32);
    CHECK(near(eval, golden.at("eval_logits"), tol));
}

TEST_CASE("every seed-network layer: generated kernels give the runtime-shaped kernels' bits", "[e2e][registry]")
{
    // The layers of gen/examples/*.arch (both networks are generated into this test), run as
    // runtime-shaped blocks on small inputs with the registry on (specialized) and off.
    struct layer {
        index_t in, out, k, s, p;
        sizes5 x;
        bool ndhwc;
    };
    const layer layers[] = {{3, 64, 7, 2, 3, {2, 3, 6, 10, 12}, true},
                            {64, 128, 3, 1, 1, {1, 64, 3, 5, 6}, true},
                            {1, 32, 3, 1, 1, {2, 1, 5, 6, 7}, false},
                            {32, 64, 3, 1, 1, {1, 32, 4, 5, 6}, false}};
    std::mt19937 g(51);
    for (const auto& l : layers) {
        INFO("Conv3d(" << l.in << ", " << l.out << ", " << l.k << ")");
        const auto x = randn(numel(l.x), g);
        for (const bool train : {true, false}) {
            auto run = [&](auto layout, bool on) {
                using L = decltype(layout);
                vf::registry::global().set_enabled(on);
                vf::ConvBnReLU3d<> block(vf::Conv3d<>(l.in, l.out, l.k, l.s, l.p), vf::BatchNorm3d<>(l.out));
                block.train(train);
                const sizes5 ys = block.output_sizes(l.x);
                std::mt19937 gd(52);
                auto xm = to_layout<L>(x, l.x), dym = to_layout<L>(randn(numel(ys), gd), ys);
                std::vector<float> ym(static_cast<std::size_t>(numel(ys))), dxm(xm.size());
                block.forward(view_of<L>(xm.data(), l.x), view_of<L>(ym.data(), ys));
                const bool specialized = block.conv().kernel_choice().specialized;
                block.backward(view_of<L>(xm.data(), l.x), view_of<L>(dym.data(), ys), view_of<L>(dxm.data(), l.x));
                vf::registry::global().set_enabled(true);
                return std::tuple{ym, dxm, vec(block.conv().weight_grad()), vec(block.bn().weight_grad()), specialized};
            };
            auto both = [&](auto layout) {
                const auto [y1, dx1, gw1, gg1, s1] = run(layout, true);
                const auto [y2, dx2, gw2, gg2, s2] = run(layout, false);
                REQUIRE(s1);
                REQUIRE_FALSE(s2);
                REQUIRE(same_bits(y1, y2));
                REQUIRE(same_bits(dx1, dx2));
                REQUIRE(same_bits(gw1, gw2));
                REQUIRE(same_bits(gg1, gg2));
            };
            if (l.ndhwc) both(vf::ndhwc_t{});
            else both(vf::ncdhw_t{});
        }
    }
}
