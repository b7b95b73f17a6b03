// Conv3d against a float64 reference: random small configurations (stride, padding,
// dilation, odd sizes, channel counts that are not multiples of the vector width),
// both layouts, static spec == runtime-shaped bit for bit, grads accumulate,
// results independent of the thread count.
#include "conv_reference.hpp"

namespace {

struct conv_result {
    std::vector<float> y, dx, gw, gb;
};

/// Runs forward + backward of `conv` (weights set from w, b) on logical x / dy in layout L.
template <class L, class Conv>
conv_result run_conv(Conv& conv, const conv_reference& ref, const std::vector<float>& x, const std::vector<float>& w,
                     const std::vector<float>& b, const std::vector<float>& dy)
{
    std::copy(w.begin(), w.end(), conv.weight().begin());
    std::copy(b.begin(), b.end(), conv.bias().begin());
    auto xm = to_layout<L>(x, ref.xs);
    auto ym = to_layout<L>(std::vector<float>(static_cast<std::size_t>(numel(ref.ys)), NAN), ref.ys);
    auto dym = to_layout<L>(dy, ref.ys);
    auto dxm = to_layout<L>(std::vector<float>(x.size(), NAN), ref.xs);
    conv.forward(view_of<L>(xm.data(), ref.xs), view_of<L>(ym.data(), ref.ys));
    conv.backward(view_of<L>(xm.data(), ref.xs), view_of<L>(dym.data(), ref.ys), view_of<L>(dxm.data(), ref.xs));
    return {from_layout<L>(ym, ref.ys), from_layout<L>(dxm, ref.xs), vec(conv.weight_grad()), vec(conv.bias_grad())};
}

void check_against_reference(const conv_result& r, const conv_reference& ref)
{
    INFO("y");
    CHECK(first_outside(r.y, ref.y, ref.y_bound) == -1);
    INFO("dx");
    CHECK(first_outside(r.dx, ref.dx, ref.dx_bound) == -1);
    INFO("dw");
    CHECK(first_outside(r.gw, ref.dw, ref.dw_bound) == -1);
    if (ref.cf.bias) {
        INFO("db");
        CHECK(first_outside(r.gb, ref.db, ref.db_bound) == -1);
    }
}

struct case_t {
    conv_config cf;
    sizes5 xs;
};

std::vector<case_t> random_cases(int count, unsigned seed)
{
    std::mt19937 g(seed);
    auto pick = [&](int lo, int hi) { return static_cast<index_t>(std::uniform_int_distribution<int>(lo, hi)(g)); };
    const index_t channels[] = {1, 2, 3, 5, 8, 16, 17, 33, 40};
    std::vector<case_t> out;
    while (static_cast<int>(out.size()) < count) {
        conv_config cf{channels[pick(0, 8)], channels[pick(0, 8)], {pick(1, 3), pick(1, 3), pick(1, 4)},
                       {pick(1, 2), pick(1, 2), pick(1, 3)}, {pick(0, 2), pick(0, 1), pick(0, 2)},
                       {pick(1, 2), 1, pick(1, 2)}, pick(0, 3) != 0};
        const sizes5 xs{pick(1, 2), cf.in, pick(1, 5), pick(1, 6), pick(1, 13)};
        bool fits = true;
        for (int i = 0; i < 3; ++i) fits &= xs[2 + i] + 2 * cf.p[i] >= cf.dil[i] * (cf.k[i] - 1) + 1;
        if (fits) out.push_back({cf, xs});
    }
    return out;
}

std::string describe(const case_t& c)
{
    return "in " + std::to_string(c.cf.in) + " out " + std::to_string(c.cf.out) + " k " + c.cf.k.str() + " s " +
           c.cf.s.str() + " p " + c.cf.p.str() + " dil " + c.cf.dil.str() + " bias " + std::to_string(c.cf.bias) +
           " x " + vf::detail::sizes_str(c.xs);
}

} // namespace

TEST_CASE("Conv3d forward and backward match a float64 reference", "[conv][numerics]")
{
    std::mt19937 g(21);
    for (const auto& c : random_cases(60, 5)) {
        INFO(describe(c));
        conv_reference ref(c.cf, c.xs);
        const auto x = randn(numel(c.xs), g), dy = randn(numel(ref.ys), g);
        const auto w = randn(c.cf.out * c.cf.in * ref.taps(), g, 0.0, 0.3), b = randn(c.cf.out, g);
        ref.forward(x, w, b);
        ref.backward(x, w, dy);
        vf::Conv3d<> a(c.cf.in, c.cf.out, c.cf.k, c.cf.s, c.cf.p, c.cf.dil, 1, c.cf.bias);
        const auto r1 = run_conv<vf::ndhwc_t>(a, ref, x, w, c.cf.bias ? b : std::vector<float>{}, dy);
        check_against_reference(r1, ref);
        vf::Conv3d<> m(c.cf.in, c.cf.out, c.cf.k, c.cf.s, c.cf.p, c.cf.dil, 1, c.cf.bias);
        const auto r2 = run_conv<vf::ncdhw_t>(m, ref, x, w, c.cf.bias ? b : std::vector<float>{}, dy);
        // Both layouts run the same channels-last kernels: the same bits.
        REQUIRE(same_bits(r1.y, r2.y));
        REQUIRE(same_bits(r1.dx, r2.dx));
        REQUIRE(same_bits(r1.gw, r2.gw));
        REQUIRE(same_bits(r1.gb, r2.gb));
    }
}
