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
    REQUIRE(padding_untouched<L>(ym, ref.ys));
    REQUIRE(padding_untouched<L>(dxm, ref.xs));
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

/// A layer's float64 reference on random data from g (x, dy, weights of std 0.3, bias, drawn in
/// that order) with its forward and backward run.
struct reference_case {
    conv_reference ref;
    std::vector<float> x, dy, w, b;
    reference_case(const conv_config& cf, const sizes5& xs, std::mt19937& g) : ref(cf, xs)
    {
        x = randn(numel(xs), g);
        dy = randn(numel(ref.ys), g);
        w = randn(cf.out * cf.in * ref.taps(), g, 0.0, 0.3);
        b = randn(cf.out, g);
        ref.forward(x, w, b);
        ref.backward(x, w, dy);
    }
};

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

/// Case c through the runtime-shaped Conv3d in the three layouts, on random data from g: NDHWC
/// against the float64 reference, NCDHW and nCdhw16c the same bits (every layout runs the same
/// channels-last kernels), nCdhw16c's padding lanes untouched.  probe(conv) sees the NDHWC module
/// before it runs.
template <class Probe>
void check_case(const case_t& c, std::mt19937& g, Probe&& probe)
{
    const reference_case rc(c.cf, c.xs, g);
    const auto& [ref, x, dy, w, b] = rc;
    const auto bias = c.cf.bias ? b : std::vector<float>{};
    vf::Conv3d<> a(c.cf.in, c.cf.out, c.cf.k, c.cf.s, c.cf.p, c.cf.dil, 1, c.cf.bias);
    probe(a);
    const auto r1 = run_conv<vf::ndhwc_t>(a, ref, x, w, bias, dy);
    check_against_reference(r1, ref);
    vf::Conv3d<> m(c.cf.in, c.cf.out, c.cf.k, c.cf.s, c.cf.p, c.cf.dil, 1, c.cf.bias);
    auto same_as_ndhwc = [&](const conv_result& r) {
        REQUIRE(same_bits(r1.y, r.y));
        REQUIRE(same_bits(r1.dx, r.dx));
        REQUIRE(same_bits(r1.gw, r.gw));
        REQUIRE(same_bits(r1.gb, r.gb));
    };
    same_as_ndhwc(run_conv<vf::ncdhw_t>(m, ref, x, w, bias, dy));
    vf::Conv3d<> bl(c.cf.in, c.cf.out, c.cf.k, c.cf.s, c.cf.p, c.cf.dil, 1, c.cf.bias);
    same_as_ndhwc(run_conv<vf::nCdhw16c_t>(bl, ref, x, w, bias, dy));
}

} // namespace

TEST_CASE("Conv3d forward and backward match a float64 reference", "[conv][numerics]")
{
    std::mt19937 g(21);
    for (const auto& c : random_cases(60, 5)) {
        INFO(describe(c));
        check_case(c, g, [](const vf::Conv3d<>&) {});
    }
}

TEST_CASE("Conv3d with channels past one block of packed weights matches a float64 reference", "[conv][numerics]")
{
    // Packed weights are blocked in 4 vectors of lanes (pack_chunk): 70 and 81 channels end in
    // a narrower block, both as output channels (forward) and as input channels (grad input as a
    // forward conv of dY), at the w border (padding 2) and inside, with stride 1 and 2 along w.
    std::mt19937 g(23);
    for (const case_t& c : {case_t{conv_config{70, 81, {3, 3, 5}, 1, {1, 0, 2}, 1, true}, sizes5{1, 70, 3, 4, 13}},
                           case_t{conv_config{81, 70, {1, 2, 3}, {1, 1, 2}, {0, 1, 1}, 1, false}, sizes5{2, 81, 2, 3, 9}}}) {
        INFO(describe(c));
        check_case(c, g, [](const vf::Conv3d<>&) {});
    }
}

TEST_CASE("a static conv_spec and the runtime-shaped Conv3d give identical bits", "[conv][static]")
{
    std::mt19937 g(22);
    const conv_config cf{17, 33, {3, 3, 3}, {1, 2, 1}, {1, 0, 1}, 1, true};
    const sizes5 xs{2, 17, 5, 6, 11};
    conv_reference ref(cf, xs);
    const auto x = randn(numel(xs), g), dy = randn(numel(ref.ys), g);
    const auto w = randn(cf.out * cf.in * ref.taps(), g, 0.0, 0.3), b = randn(cf.out, g);
    vf::Conv3d<> dyn(17, 33, 3, {1, 2, 1}, {1, 0, 1});
    vf::Conv3d<vf::conv_spec{.in = 17, .out = 33, .kernel = 3, .stride = {1, 2, 1}, .padding = {1, 0, 1}, .dilation = 1}>
        fixed;
    vf::Conv3d<vf::conv_spec{.in = 17, .out = 33}> partly(17, 33, 3, {1, 2, 1}, {1, 0, 1});
    const auto r1 = run_conv<vf::ndhwc_t>(dyn, ref, x, w, b, dy);
    const auto r2 = run_conv<vf::ndhwc_t>(fixed, ref, x, w, b, dy);
    const auto r3 = run_conv<vf::ndhwc_t>(partly, ref, x, w, b, dy);
    for (const auto* r : {&r2, &r3}) {
        REQUIRE(same_bits(r1.y, r->y));
        REQUIRE(same_bits(r1.dx, r->dx));
        REQUIRE(same_bits(r1.gw, r->gw));
        REQUIRE(same_bits(r1.gb, r->gb));
    }
    REQUIRE(fixed.repr() == "Conv3d(17, 33, kernel_size=(3, 3, 3), stride=(1, 2, 1), padding=(1, 0, 1))");
}

TEST_CASE("Conv3d results do not depend on the thread count", "[conv][parallel]")
{
    std::mt19937 g(23);
    const conv_config cf{20, 40, {3, 2, 3}, {2, 1, 1}, {1, 1, 0}, {1, 1, 2}, true};
    const sizes5 xs{3, 20, 7, 5, 12};
    conv_reference ref(cf, xs);
    const auto x = randn(numel(xs), g), dy = randn(numel(ref.ys), g);
    const auto w = randn(cf.out * cf.in * ref.taps(), g, 0.0, 0.3), b = randn(cf.out, g);
    std::vector<conv_result> results;
    for (int t : {1, 2, 3}) {
        vf::set_num_threads(t);
        vf::Conv3d<> conv(cf.in, cf.out, cf.k, cf.s, cf.p, cf.dil);
        results.push_back(run_conv<vf::ndhwc_t>(conv, ref, x, w, b, dy));
    }
    vf::set_num_threads(1);
    for (std::size_t i = 1; i < results.size(); ++i) {
        REQUIRE(same_bits(results[0].y, results[i].y));
        REQUIRE(same_bits(results[0].dx, results[i].dx));
        REQUIRE(same_bits(results[0].gw, results[i].gw));
        REQUIRE(same_bits(results[0].gb, results[i].gb));
    }
}

TEST_CASE("Conv3d gradients accumulate until zero_grad; dX is overwritten", "[conv][semantics]")
{
    std::mt19937 g(24);
    const conv_config cf{4, 5, {3, 3, 3}, 1, 1};
    const sizes5 xs{1, 4, 3, 4, 5};
    conv_reference ref(cf, xs);
    const auto x = randn(numel(xs), g), dy = randn(numel(ref.ys), g);
    const auto w = randn(cf.out * cf.in * ref.taps(), g), b = randn(cf.out, g);
    vf::Conv3d<> conv(4, 5, 3, 1, 1);
    const auto once = run_conv<vf::ndhwc_t>(conv, ref, x, w, b, dy);
    const auto twice = run_conv<vf::ndhwc_t>(conv, ref, x, w, b, dy);
    REQUIRE(same_bits(once.dx, twice.dx));
    for (std::size_t i = 0; i < once.gw.size(); ++i) REQUIRE(twice.gw[i] == once.gw[i] + once.gw[i]);
    for (std::size_t i = 0; i < once.gb.size(); ++i) REQUIRE(twice.gb[i] == once.gb[i] + once.gb[i]);
    conv.zero_grad();
    for (float v : conv.weight_grad()) REQUIRE(v == 0.f);
    for (float v : conv.bias_grad()) REQUIRE(v == 0.f);
}

TEST_CASE("the float64 conv reference's backward matches its own finite differences", "[conv][gradcheck]")
{
    // volfuse is checked against this reference; here the reference's backward is checked
    // against central differences of its forward (exact in double up to O(h^2), and the
    // loss is linear in each of x and w, so the difference is exact up to rounding).
    std::mt19937 g(25);
    const conv_config cf{2, 3, {2, 3, 2}, {2, 1, 1}, {1, 1, 0}, {1, 2, 1}, true};
    const sizes5 xs{2, 2, 4, 6, 5};
    conv_reference ref(cf, xs);
    auto x = randn(numel(xs), g), w = randn(cf.out * cf.in * ref.taps(), g), b = randn(cf.out, g);
    const auto dy = randn(numel(ref.ys), g);
    ref.backward(x, w, dy);
    auto loss = [&](const std::vector<float>& xx, const std::vector<float>& ww, const std::vector<float>& bb) {
        conv_reference r(cf, xs);
        r.forward(xx, ww, bb);
        double l = 0;
        for (std::size_t i = 0; i < dy.size(); ++i) l += r.y[i] * dy[i];
        return l;
    };
    const float h = 0.25f; // loss is linear in each argument: any step gives the derivative
    auto check = [&](std::vector<float>& v, const std::vector<double>& grad) {
        for (std::size_t i = 0; i < v.size(); i += 3) {
            const float keep = v[i];
            v[i] = keep + h;
            const double up = loss(x, w, b), hu = static_cast<double>(v[i]) - keep; // the step float really took
            v[i] = keep - h;
            const double down = loss(x, w, b), hd = keep - static_cast<double>(v[i]);
            v[i] = keep;
            REQUIRE(std::abs((up - down) / (hu + hd) - grad[i]) <= 1e-9 * (1 + std::abs(grad[i])));
        }
    };
    check(x, ref.dx);
    check(w, ref.dw);
    check(b, ref.db);
}

TEST_CASE("stride-1 grad input runs as a forward conv of dY and matches the float64 reference", "[conv][numerics]")
{
    // Stride 1 with padding within the dilated kernel: dX is the forward kernel on dY with
    // flipped, transposed weights.  Random kernels, paddings, dilations, odd sizes, channel
    // counts that are not multiples of the vector width; both layouts; a spec that fixes
    // everything (the formulation chosen at compile time) gives the runtime-shaped bits.
    std::mt19937 g(26);
    std::mt19937 pickg(27);
    auto pick = [&](int lo, int hi) { return static_cast<index_t>(std::uniform_int_distribution<int>(lo, hi)(pickg)); };
    const index_t channels[] = {1, 3, 5, 16, 17, 33};
    for (int i = 0; i < 25; ++i) {
        const vf::size3 k{pick(1, 3), pick(1, 3), pick(1, 5)}, dil{pick(1, 2), 1, pick(1, 2)};
        const vf::size3 p{pick(0, dil.d * (k.d - 1)), pick(0, k.h - 1), pick(0, dil.w * (k.w - 1))};
        const conv_config cf{channels[pick(0, 5)], channels[pick(0, 5)], k, 1, p, dil, pick(0, 1) != 0};
        const sizes5 xs{pick(1, 2), cf.in, dil.d * (k.d - 1) + pick(1, 3), k.h + pick(0, 4), dil.w * (k.w - 1) + pick(1, 13)};
        const case_t c{cf, xs};
        INFO(describe(c));
        check_case(c, g, [&](const vf::Conv3d<>& a) {
            // (in_channels <= 4 run the narrow kernel instead: tested below)
            REQUIRE(vf::kernels::conv::grad_input_as_forward(a.geom()) ==
                    (cf.in > vf::kernels::conv::narrow_channels));
        });
    }
    // Fixed at compile time: only the forward formulation is instantiated.
    const conv_config cf{17, 20, {3, 3, 3}, 1, {1, 2, 0}, {1, 1, 2}, true};
    const sizes5 xs{2, 17, 4, 5, 9};
    conv_reference ref(cf, xs);
    const auto x = randn(numel(xs), g), dy = randn(numel(ref.ys), g);
    const auto w = randn(cf.out * cf.in * ref.taps(), g, 0.0, 0.3), b = randn(cf.out, g);
    vf::Conv3d<> dyn(17, 20, 3, 1, {1, 2, 0}, {1, 1, 2});
    vf::Conv3d<vf::conv_spec{.in = 17, .out = 20, .kernel = 3, .stride = 1, .padding = {1, 2, 0}, .dilation = {1, 1, 2}}>
        fixed;
    const auto r1 = run_conv<vf::ndhwc_t>(dyn, ref, x, w, b, dy);
    const auto r2 = run_conv<vf::ndhwc_t>(fixed, ref, x, w, b, dy);
    REQUIRE(same_bits(r1.dx, r2.dx));
    REQUIRE(same_bits(r1.gw, r2.gw));
}

TEST_CASE("in_channels 1-4: grad input vectorized over output channels matches the reference", "[conv][numerics]")
{
    // The narrow grad input (a network's first layer): any stride, padding, dilation, output
    // channels with a vector tail, counts of whole vectors from 0 to past the 4 the runtime-shaped
    // kernel fixes at compile time (80 channels: 5 AVX-512 vectors); both layouts; a spec fixing
    // everything gives the same bits.
    std::mt19937 g(28);
    std::mt19937 pickg(29);
    auto pick = [&](int lo, int hi) { return static_cast<index_t>(std::uniform_int_distribution<int>(lo, hi)(pickg)); };
    const index_t outs[] = {1, 7, 16, 20, 40, 64, 80, 90};
    for (int i = 0; i < 25; ++i) {
        const vf::size3 k{pick(1, 3), pick(1, 3), pick(1, 7)}, s{pick(1, 2), pick(1, 2), pick(1, 3)},
            dil{pick(1, 2), 1, pick(1, 2)};
        const vf::size3 p{pick(0, 2), pick(0, 1), pick(0, 3)};
        const conv_config cf{pick(1, 4), outs[pick(0, 7)], k, s, p, dil, true};
        const sizes5 xs{pick(1, 2), cf.in, dil.d * (k.d - 1) + pick(1, 4), k.h + pick(0, 4), dil.w * (k.w - 1) + pick(1, 20)};
        const case_t c{cf, xs};
        INFO(describe(c));
        check_case(c, g, [](const vf::Conv3d<>& a) {
            REQUIRE(vf::kernels::conv::grad_input_packing(a.geom()) == vf::kernels::conv::packing::forward_rows);
        });
    }
    // Specialized == runtime-shaped: 20 output channels (a whole vector and a tail on AVX-512,
    // counts the runtime-shaped kernel fixes at compile time) and 90 (5 whole vectors and a
    // tail on AVX-512: counted at run time there, fixed in the spec).
    auto same_as_fixed = [&]<vf::index_t OC>() {
        const conv_config cf{3, OC, {3, 5, 7}, {1, 2, 2}, {1, 2, 3}, 1, true};
        const sizes5 xs{2, 3, 4, 9, 15};
        const reference_case rc(cf, xs, g);
        const auto& [ref, x, dy, w, b] = rc;
        vf::Conv3d<> dyn(3, OC, {3, 5, 7}, {1, 2, 2}, {1, 2, 3});
        vf::Conv3d<vf::conv_spec{.in = 3, .out = OC, .kernel = {3, 5, 7}, .stride = {1, 2, 2}, .padding = {1, 2, 3},
                                 .dilation = 1}>
            fixed;
        const auto r1 = run_conv<vf::ndhwc_t>(dyn, ref, x, w, b, dy);
        const auto r2 = run_conv<vf::ndhwc_t>(fixed, ref, x, w, b, dy);
        check_against_reference(r1, ref);
        REQUIRE(same_bits(r1.dx, r2.dx));
    };
    same_as_fixed.template operator()<20>();
    same_as_fixed.template operator()<90>();
}

TEST_CASE("simd::halving_sum is the scalar halving tree, bit for bit", "[conv][simd]")
{
    // The narrow grad input's lane reduction: vector halves on x86, this tree elsewhere.  Values
    // of mixed magnitudes and signs make any other order round differently.
    std::mt19937 g(31);
    std::uniform_real_distribution<float> mant(-1.f, 1.f);
    std::uniform_int_distribution<int> expo(-20, 20);
    for (int trial = 0; trial < 1000; ++trial) {
        std::array<float, vf::simd::fvec::size> l;
        for (auto& v : l) v = std::ldexp(mant(g), expo(g));
        const float got = vf::simd::halving_sum(vf::simd::fvec::load_unaligned(l.data()));
        for (std::size_t h = l.size() / 2; h >= 1; h /= 2)
            for (std::size_t i = 0; i < h; ++i) l[i] += l[i + h];
        REQUIRE(same_bits(std::vector<float>{got}, std::vector<float>{l[0]}));
    }
}

TEST_CASE("kernels with more taps than one tap table holds match the reference", "[conv][numerics]")
{
    // Tap tables hold 343 taps (7x7x7); larger kernels are walked in segments: the forward (and
    // stride-1 grad input as a forward), the gather grad input (stride > 1) and the narrow one
    // (in_channels <= 4), with padding so that border tiles see partial segments.
    std::mt19937 g(30);
    for (const case_t& c : {case_t{conv_config{3, 20, {8, 7, 7}, {1, 2, 1}, {2, 3, 3}, 1, true}, sizes5{1, 3, 9, 8, 11}},
                           case_t{conv_config{17, 9, {7, 8, 7}, {2, 1, 2}, {3, 1, 3}, 1, false}, sizes5{1, 17, 9, 9, 12}},
                           case_t{conv_config{5, 6, {8, 8, 6}, 1, {2, 4, 1}, 1, true}, sizes5{1, 5, 8, 9, 7}}}) {
        INFO(describe(c));
        check_case(c, g, [](const vf::Conv3d<>&) {});
    }
}

TEST_CASE("backward_input and backward_weight are backward's two halves", "[conv][semantics]")
{
    // torch.nn.grad.conv3d_input / conv3d_weight: the same bits as backward, both layouts,
    // stride 1 (forward formulation) and stride 2 (scatter); backward_input changes no grad.
    std::mt19937 g(28);
    for (const index_t s : {1, 2}) {
        const conv_config cf{5, 19, {3, 2, 3}, s, 1, 1, true};
        const sizes5 xs{2, 5, 5, 4, 9};
        const reference_case rc(cf, xs, g);
        const auto& [ref, x, dy, w, b] = rc;
        auto both = [&]<class L>(L) {
            vf::Conv3d<> whole(5, 19, {3, 2, 3}, s, 1), halves(5, 19, {3, 2, 3}, s, 1);
            const auto r = run_conv<L>(whole, ref, x, w, b, dy);
            std::copy(w.begin(), w.end(), halves.weight().begin());
            auto xm = to_layout<L>(x, ref.xs), dym = to_layout<L>(dy, ref.ys);
            auto dxm = to_layout<L>(std::vector<float>(x.size(), NAN), ref.xs);
            halves.backward_input(view_of<L>(dym.data(), ref.ys), view_of<L>(dxm.data(), ref.xs));
            for (float v : halves.weight_grad()) REQUIRE(v == 0.f);
            for (float v : halves.bias_grad()) REQUIRE(v == 0.f);
            REQUIRE(same_bits(from_layout<L>(dxm, ref.xs), r.dx));
            halves.backward_weight(view_of<L>(xm.data(), ref.xs),
                                   view_of<L>(dym.data(), ref.ys));
            REQUIRE(same_bits(vec(halves.weight_grad()), r.gw));
            REQUIRE(same_bits(vec(halves.bias_grad()), r.gb));
            check_against_reference(r, ref);
        };
        both(vf::ndhwc_t{});
        both(vf::ncdhw_t{});
    }
}

TEST_CASE("Conv3d<spec, double>: the same kernel templates in float64 match the float64 reference", "[conv][double]")
{
    // The reference's bounds are float32's (n * 2^-24 * sum |terms|); a float64 result's error is
    // the same bound times 2^-29: 1e-8 of the bound leaves a margin of 5.
    std::mt19937 g(31);
    auto as_double = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
    auto within = [](const std::vector<double>& got, const std::vector<double>& want, const std::vector<double>& bound) {
        for (std::size_t i = 0; i < got.size(); ++i)
            if (!(std::abs(got[i] - want[i]) <= 1e-8 * bound[i] + 1e-300)) return static_cast<long>(i);
        return -1L;
    };
    for (const auto& c : random_cases(30, 9)) {
        INFO(describe(c));
        const reference_case rc(c.cf, c.xs, g);
        const auto& ref = rc.ref;
        const auto x = as_double(rc.x), dy = as_double(rc.dy), w = as_double(rc.w);
        const auto b = c.cf.bias ? as_double(rc.b) : std::vector<double>{};
        std::vector<double> first_y;
        auto run = [&]<class L>(L) {
            vf::Conv3d<vf::conv_spec{}, double> conv(c.cf.in, c.cf.out, c.cf.k, c.cf.s, c.cf.p, c.cf.dil, 1, c.cf.bias);
            REQUIRE(std::string(conv.kernel_choice(L{}).why).find("float64") != std::string::npos);
            std::copy(w.begin(), w.end(), conv.weight().begin());
            std::copy(b.begin(), b.end(), conv.bias().begin());
            auto xm = to_layout<L>(x, ref.xs), dym = to_layout<L>(dy, ref.ys);
            auto ym = to_layout<L>(std::vector<double>(static_cast<std::size_t>(numel(ref.ys)), NAN), ref.ys);
            auto dxm = to_layout<L>(std::vector<double>(x.size(), NAN), ref.xs);
            conv.forward(view_of<L>(xm.data(), ref.xs), view_of<L>(ym.data(), ref.ys));
            conv.backward(view_of<L>(xm.data(), ref.xs), view_of<L>(dym.data(), ref.ys), view_of<L>(dxm.data(), ref.xs));
            const auto y = from_layout<L>(ym, ref.ys), dx = from_layout<L>(dxm, ref.xs);
            CHECK(within(y, ref.y, ref.y_bound) == -1);
            CHECK(within(dx, ref.dx, ref.dx_bound) == -1);
            auto doubles = [](auto s) { return std::vector<double>(s.begin(), s.end()); };
            CHECK(within(doubles(conv.weight_grad()), ref.dw, ref.dw_bound) == -1);
            if (c.cf.bias) CHECK(within(doubles(conv.bias_grad()), ref.db, ref.db_bound) == -1);
        };
        run(vf::ndhwc);
        run(vf::ncdhw);
    }
}

TEST_CASE("ConvBnReLU3d in float64 equals its parts in float64", "[conv][double]")
{
    std::mt19937 g(32);
    const sizes5 xs{2, 3, 4, 5, 6}, ys{2, 7, 4, 5, 6};
    const auto xf = randn(numel(xs), g), dyf = randn(numel(ys), g), wf = randn(7 * 3 * 27, g, 0.0, 0.3);
    const std::vector<double> x(xf.begin(), xf.end()), dy(dyf.begin(), dyf.end()), w(wf.begin(), wf.end());
    using conv_d = vf::Conv3d<vf::conv_spec{}, double>;
    using bn_d = vf::BatchNorm3d<vf::dynamic, double>;
    for (bool training : {true, false}) {
        INFO("training " << training);
        vf::ConvBnReLU3d block(conv_d(3, 7, 3, 1, 1), bn_d(7));
        conv_d conv(3, 7, 3, 1, 1);
        bn_d bn(7);
        std::copy(w.begin(), w.end(), block.conv().weight().begin());
        std::copy(w.begin(), w.end(), conv.weight().begin());
        std::copy(conv.bias().begin(), conv.bias().end(), block.conv().bias().begin());
        for (index_t c = 0; c < 7; ++c) {
            block.bn().running_mean()[c] = bn.running_mean()[c] = 0.1 * static_cast<double>(c);
            block.bn().running_var()[c] = bn.running_var()[c] = 1.0 + 0.2 * static_cast<double>(c);
        }
        block.train(training), bn.train(training);
        std::vector<double> y(static_cast<std::size_t>(numel(ys))), z(y.size()), yr(y.size()), dx(x.size()),
            dz(y.size()), dxr(x.size());
        const auto X = view_of<vf::ncdhw_t>(x.data(), xs);
        block.forward(X, view_of<vf::ncdhw_t>(y.data(), ys));
        conv.forward(X, view_of<vf::ncdhw_t>(z.data(), ys));
        bn.forward(view_of<vf::ncdhw_t>(z.data(), ys).as_const(), view_of<vf::ncdhw_t>(yr.data(), ys), vf::relu);
        for (std::size_t i = 0; i < y.size(); ++i) REQUIRE(std::abs(y[i] - yr[i]) <= 1e-12);
        block.backward(X, view_of<vf::ncdhw_t>(dy.data(), ys), view_of<vf::ncdhw_t>(dx.data(), xs));
        bn.backward(view_of<vf::ncdhw_t>(z.data(), ys).as_const(), view_of<vf::ncdhw_t>(dy.data(), ys),
                    view_of<vf::ncdhw_t>(dz.data(), ys), vf::relu);
        conv.backward(X, view_of<vf::ncdhw_t>(dz.data(), ys), view_of<vf::ncdhw_t>(dxr.data(), xs));
        for (std::size_t i = 0; i < dx.size(); ++i) REQUIRE(std::abs(dx[i] - dxr[i]) <= 1e-11);
        for (std::size_t i = 0; i < w.size(); ++i)
            REQUIRE(std::abs(block.conv().weight_grad()[i] - conv.weight_grad()[i]) <= 1e-10);
        for (index_t c = 0; c < 7; ++c) {
            REQUIRE(std::abs(block.bn().running_var()[c] - bn.running_var()[c]) <= 1e-13);
            REQUIRE(std::abs(block.bn().weight_grad()[c] - bn.weight_grad()[c]) <= 1e-10);
        }
    }
}
