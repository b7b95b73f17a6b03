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
