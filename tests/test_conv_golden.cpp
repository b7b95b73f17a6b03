// Conv3d against PyTorch 1.13 on the seed's conv layers (tests/golden/conv3d.*, written by
// make_conv_golden.py): forward and backward, both layouts, runtime-shaped and specialized.
// PyTorch and volfuse sum in different orders; each is within (K + 2) * 2^-24 * sum|terms|
// of the exact result (float64 reference), so they may differ by twice that.
#include <fstream>
#include <sstream>

#include "conv_reference.hpp"

namespace {

std::vector<float> pattern(index_t n, std::int64_t a, std::int64_t b, std::int64_t m, std::int64_t center, double scale)
{
    std::vector<float> v(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) v[i] = static_cast<float>(static_cast<double>((i * a + b) % m - center) / scale);
    return v;
}

struct golden_case {
    std::string name;
    conv_config cf;
    sizes5 xs;
    std::vector<float> y, dx, dw, db;
};

std::vector<golden_case> load()
{
    std::ifstream txt(VOLFUSE_GOLDEN_DIR "/conv3d.txt"), bin(VOLFUSE_GOLDEN_DIR "/conv3d.bin", std::ios::binary);
    REQUIRE(txt.good());
    REQUIRE(bin.good());
    std::vector<golden_case> out;
    std::string line;
    while (std::getline(txt, line)) {
        std::istringstream in(line);
        golden_case c;
        index_t v[18];
        in >> c.name;
        for (auto& x : v) in >> x;
        c.cf = {v[0], v[1], {v[2], v[3], v[4]}, {v[5], v[6], v[7]}, {v[8], v[9], v[10]}, {v[11], v[12], v[13]}, v[14] != 0};
        c.xs = {v[15], v[0], v[16], v[17], 0};
        in >> c.xs[4];
        for (auto* t : {&c.y, &c.dx, &c.dw, &c.db}) {
            index_t n;
            in >> n;
            t->resize(static_cast<std::size_t>(n));
            bin.read(reinterpret_cast<char*>(t->data()), static_cast<std::streamsize>(n * sizeof(float)));
        }
        REQUIRE(in);
        REQUIRE(bin);
        out.push_back(std::move(c));
    }
    return out;
}

long first_apart(const std::vector<float>& got, const std::vector<float>& torch, const std::vector<double>& bound)
{
    if (got.size() != torch.size() || got.size() != bound.size()) return 0;
    for (std::size_t i = 0; i < got.size(); ++i)
        if (!(std::abs(static_cast<double>(got[i]) - torch[i]) <= 2 * bound[i])) return static_cast<long>(i);
    return -1;
}

template <class L, class Conv>
void check_case(Conv& conv, const golden_case& c)
{
    conv_reference ref(c.cf, c.xs);
    const auto x = pattern(numel(c.xs), 7919, 13, 257, 128, 128.0);
    const auto w = pattern(c.cf.out * c.cf.in * ref.taps(), 104729, 7, 263, 131, 4096.0);
    const auto b = c.cf.bias ? pattern(c.cf.out, 31, 5, 17, 8, 16.0) : std::vector<float>{};
    const auto dy = pattern(numel(ref.ys), 15485863, 3, 241, 120, 128.0);
    REQUIRE(static_cast<index_t>(c.y.size()) == numel(ref.ys));
    ref.forward(x, w, b);
    ref.backward(x, w, dy);
    std::copy(w.begin(), w.end(), conv.weight().begin());
    std::copy(b.begin(), b.end(), conv.bias().begin());
    conv.zero_grad();
    auto xm = to_layout<L>(x, c.xs), dym = to_layout<L>(dy, ref.ys);
    auto ym = to_layout<L>(std::vector<float>(c.y.size(), NAN), ref.ys);
    auto dxm = to_layout<L>(std::vector<float>(x.size(), NAN), c.xs);
    conv.forward(view_of<L>(xm.data(), c.xs), view_of<L>(ym.data(), ref.ys));
    conv.backward(view_of<L>(xm.data(), c.xs), view_of<L>(dym.data(), ref.ys), view_of<L>(dxm.data(), c.xs));
    CHECK(first_apart(from_layout<L>(ym, ref.ys), c.y, ref.y_bound) == -1);
    CHECK(first_apart(from_layout<L>(dxm, c.xs), c.dx, ref.dx_bound) == -1);
    CHECK(first_apart(vec(conv.weight_grad()), c.dw, ref.dw_bound) == -1);
    if (c.cf.bias) CHECK(first_apart(vec(conv.bias_grad()), c.db, ref.db_bound) == -1);
}

} // namespace

TEST_CASE("Conv3d matches PyTorch on the seed's conv layers", "[conv][golden]")
{
    const auto cases = load();
    REQUIRE(cases.size() == 4);
    for (const auto& c : cases) {
        INFO(c.name);
        vf::Conv3d<> dyn(c.cf.in, c.cf.out, c.cf.k, c.cf.s, c.cf.p, c.cf.dil, 1, c.cf.bias);
        check_case<vf::ncdhw_t>(dyn, c);
        check_case<vf::ndhwc_t>(dyn, c);
    }
}

TEST_CASE("specialized seed layers match PyTorch too", "[conv][golden][static]")
{
    const auto cases = load();
    vf::Conv3d<vf::conv_spec{.in = 3, .out = 64, .kernel = 7, .stride = 2, .padding = 3}> video_conv1;
    vf::Conv3d<vf::conv_spec{.in = 64, .out = 128, .kernel = 3, .stride = 1, .padding = 1}> video_conv2;
    vf::Conv3d<vf::conv_spec{.in = 1, .out = 32, .kernel = 3, .stride = 1, .padding = 1}> medical_conv1;
    vf::Conv3d<vf::conv_spec{.in = 32, .out = 64, .kernel = 3, .stride = 1, .padding = 1}> medical_conv2(
        32, 64, 3, 1, 1, 1, 1, false);
    check_case<vf::ndhwc_t>(video_conv1, cases[0]);
    check_case<vf::ndhwc_t>(video_conv2, cases[1]);
    check_case<vf::ncdhw_t>(medical_conv1, cases[2]);
    check_case<vf::ncdhw_t>(medical_conv2, cases[3]);
}

namespace {

/// max |got - torch| <= tol * max|reference| (both within tol/2 of the exact chain: see
/// test_conv_bn_relu.cpp for the norm-wise bound).
bool near_torch(const std::vector<float>& got, const std::vector<float>& torch, double tol, double scale)
{
    if (got.size() != torch.size()) return false;
    for (std::size_t i = 0; i < got.size(); ++i)
        if (!(std::abs(static_cast<double>(got[i]) - torch[i]) <= tol * scale)) return false;
    return true;
}

} // namespace

TEST_CASE("ConvBnReLU3d matches PyTorch's Conv3d -> BatchNorm3d -> ReLU, train then eval", "[block][golden]")
{
    std::ifstream txt(VOLFUSE_GOLDEN_DIR "/conv_bn_relu3d.txt"), bin(VOLFUSE_GOLDEN_DIR "/conv_bn_relu3d.bin",
                                                                    std::ios::binary);
    REQUIRE(txt.good());
    REQUIRE(bin.good());
    std::string line;
    int cases = 0;
    while (std::getline(txt, line)) {
        std::istringstream in(line);
        std::string name;
        index_t v[19];
        in >> name;
        for (auto& x : v) in >> x;
        index_t counts[8];
        for (auto& c : counts) in >> c;
        REQUIRE(in);
        INFO(name);
        const conv_config cf{v[0], v[1], {v[2], v[3], v[4]}, {v[5], v[6], v[7]}, {v[8], v[9], v[10]},
                             {v[11], v[12], v[13]}, v[14] != 0};
        const sizes5 xs{v[15], v[0], v[16], v[17], v[18]};
        const index_t C = cf.out;
        chain_reference ref(cf, xs);
        const auto x = pattern(numel(xs), 7919, 13, 257, 128, 128.0);
        const auto w = pattern(C * cf.in * ref.conv.taps(), 104729, 7, 263, 131, 4096.0);
        const auto b = cf.bias ? pattern(C, 31, 5, 17, 8, 16.0) : std::vector<float>(C, 0.f);
        const auto dy = pattern(numel(ref.conv.ys), 15485863, 3, 241, 120, 128.0);
        auto gamma = pattern(C, 17, 3, 13, 6, 8.0), rv = pattern(C, 3, 1, 5, 0, 4.0);
        for (auto& g : gamma) g += 1.f;
        for (auto& r : rv) r += 1.f;
        const auto beta = pattern(C, 23, 1, 11, 5, 16.0), rm = pattern(C, 5, 2, 7, 3, 8.0);

        vf::Conv3d<> conv(cf.in, C, cf.k, cf.s, cf.p, cf.dil, 1, cf.bias);
        std::copy(w.begin(), w.end(), conv.weight().begin());
        if (cf.bias) std::copy(b.begin(), b.end(), conv.bias().begin());
        vf::BatchNorm3d<> bn(C);
        std::copy(gamma.begin(), gamma.end(), bn.weight().begin());
        std::copy(beta.begin(), beta.end(), bn.bias().begin());
        std::copy(rm.begin(), rm.end(), bn.running_mean().begin());
        std::copy(rv.begin(), rv.end(), bn.running_var().begin());
        vf::ConvBnReLU3d<> block(std::move(conv), std::move(bn));
        std::vector<double> run_mean(rm.begin(), rm.end()), run_var(rv.begin(), rv.end());
        for (const bool train : {true, false}) {
            INFO((train ? "train step" : "eval step"));
            std::vector<std::vector<float>> torch(8);
            for (int k = 0; k < 8; ++k) {
                torch[k].resize(static_cast<std::size_t>(counts[k]));
                bin.read(reinterpret_cast<char*>(torch[k].data()), static_cast<std::streamsize>(counts[k] * 4));
            }
            REQUIRE(bin);
            block.train(train);
            std::vector<float> y(dy.size()), dx(x.size());
            block.forward(vf::ncdhw_view(const_cast<float*>(x.data()), xs), vf::ncdhw_view(y.data(), ref.conv.ys));
            block.backward(vf::ncdhw_view(const_cast<float*>(x.data()), xs),
                           vf::ncdhw_view(const_cast<float*>(dy.data()), ref.conv.ys), vf::ncdhw_view(dx.data(), xs));
            ref.run(x, w, b, gamma, beta, run_mean, run_var, train, 1e-5, 0.1, dy, &y);
            const index_t n = numel(ref.conv.ys) / C;
            const double tol = 2 * 4 * static_cast<double>(std::max(cf.in * ref.conv.taps(), n)) * 0x1p-24;
            CHECK(near_torch(y, torch[0], tol, max_abs(ref.y)));
            // The ReLU masks agree (a disagreement would make the gradients incomparable).
            long flips = 0;
            for (std::size_t i = 0; i < y.size(); ++i) flips += (y[i] > 0) != (torch[0][i] > 0);
            REQUIRE(flips == 0);
            CHECK(near_torch(dx, torch[1], tol, max_abs(ref.dx)));
            // Gradients accumulate over the two steps, here as in PyTorch: compare the totals
            // against the larger of the reference's step values.
            CHECK(near_torch(vec(block.conv().weight_grad()), torch[2], 2 * tol, max_abs(ref.dw)));
            CHECK(near_torch(vec(block.bn().weight_grad()), torch[4], 2 * tol, max_abs(ref.gamma_grad)));
            CHECK(near_torch(vec(block.bn().bias_grad()), torch[5], 2 * tol, max_abs(ref.beta_grad)));
            CHECK(near_torch(vec(block.bn().running_mean()), torch[6], tol, 1.0));
            CHECK(near_torch(vec(block.bn().running_var()), torch[7], tol, max_abs(ref.rv.empty() ? run_var : ref.rv)));
            if (train) run_mean = ref.rm, run_var = ref.rv;
        }
        ++cases;
    }
    REQUIRE(cases == 4);
}
