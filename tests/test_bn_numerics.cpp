// Numerics against a float64 reference over many shapes; static C == dynamic C bit
// for bit; layouts agree; in place == out of place; finite-difference gradients;
// hard data (mean >> std, 1e7-element channels).
#include <cstdlib>
#include <memory>

#include "support.hpp"

namespace {

struct config {
    sizes5 s;
    bool relu, affine;
};

std::vector<config> random_configs(int count, unsigned seed)
{
    std::mt19937 g(seed);
    auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g); };
    std::vector<config> out;
    const int channels[] = {1, 2, 3, 4, 7, 8, 16, 17, 33, 64};
    while (static_cast<int>(out.size()) < count) {
        sizes5 s{pick(1, 3), channels[pick(0, 9)], pick(1, 4), pick(1, 5), pick(1, 19)};
        if (s[0] * s[2] * s[3] * s[4] == 1) continue;
        out.push_back({s, pick(0, 1) == 1, pick(0, 3) != 0});
    }
    return out;
}

std::vector<float> random_params(index_t C, std::mt19937& g, double lo, double hi)
{
    std::uniform_real_distribution<double> u(lo, hi);
    std::vector<float> v(static_cast<std::size_t>(C));
    for (auto& p : v) p = static_cast<float>(u(g));
    return v;
}

template <class L>
void check_against_reference(const config& cf, std::mt19937& g)
{
    const index_t C = cf.s[1];
    const auto x = randn(numel(cf.s), g, 0.7, 2.0);
    const auto dy = randn(numel(cf.s), g);
    vf::BatchNorm3d<> bn(C, 1e-5, 0.1, cf.affine);
    std::vector<float> w, b;
    if (cf.affine) {
        w = random_params(C, g, 0.5, 1.5);
        b = random_params(C, g, -0.5, 0.5);
        std::copy(w.begin(), w.end(), bn.weight().begin());
        std::copy(b.begin(), b.end(), bn.bias().begin());
    }
    for (const bool train : {true, false}) {
        INFO("layout " << L::name << " shape " << vf::detail::sizes_str(cf.s) << " relu " << cf.relu << " train "
                       << train);
        bn.train(train);
        bn.zero_grad();
        const auto rm = vec(bn.running_mean()), rv = vec(bn.running_var());
        bn_run<L> r(x, cf.s);
        const auto y = r.forward(bn, cf.relu);
        reference ref;
        ref.forward(x, cf.s, w, b, train, rm, rv, 1e-5, cf.relu);
        std::vector<bool> mask;
        for_each_index(cf.s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
            CHECK_NEAR(y[i], ref.y[i], ref.bound(x, w, b, c, i));
            if (cf.relu) mask.push_back(y[i] > 0.f);
        });
        const auto dx = r.backward(bn, dy, cf.relu);
        REQUIRE(r.padding_untouched());
        const auto gr = ref.backward(x, dy, w, train, mask);
        double gmax = 0;
        for (double v : gr.gw) gmax = std::max(gmax, std::abs(v));
        for_each_index(cf.s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
            CHECK_NEAR(dx[i], gr.dx[i], ref.dx_bound(gr, x, dy, w, c, i));
        });
        const double n = static_cast<double>(numel(cf.s) / C);
        for (index_t c = 0; c < C && cf.affine; ++c) {
            CHECK_NEAR(bn.weight_grad()[c], gr.gw[c], 4e-6 * std::sqrt(n) * (gmax + 1));
            CHECK_NEAR(bn.bias_grad()[c], gr.gb[c], 4e-6 * std::sqrt(n) * (std::abs(gr.gb[c]) + 1));
        }
    }
}

template <index_t C, class L>
void static_equals_dynamic(std::mt19937& g)
{
    const sizes5 s{2, C, 3, 2, 5};
    const auto x = randn(numel(s), g, 1.0, 2.0), dy = randn(numel(s), g);
    for (const bool relu : {false, true}) {
        INFO("C " << C << " layout " << L::name << " relu " << relu);
        vf::BatchNorm3d<C> st(C);
        vf::BatchNorm3d<> dyn(C);
        const auto a = trace<L>(st, x, dy, s, relu);
        const auto b = trace<L>(dyn, x, dy, s, relu);
        for (std::size_t i = 0; i < a.size(); ++i) REQUIRE(same_bits(a[i], b[i]));
        // A view whose C is static (vf::fix<C>) takes the same path as well.
        vf::BatchNorm3d<> dyn2(C);
        auto xm = to_layout<L>(x, s);
        std::vector<float> y1(xm.size()), y2(xm.size());
        dyn2.forward(vf::make_view<L>(xm.data(), s[0], vf::fix<C>, s[2], s[3], s[4]), view_of<L>(y1.data(), s));
        vf::BatchNorm3d<> dyn3(C);
        dyn3.forward(view_of<L>(xm.data(), s), view_of<L>(y2.data(), s));
        REQUIRE(same_bits(y1, y2));
    }
}

} // namespace

TEST_CASE("forward and backward match a float64 reference over random shapes", "[bn][numerics]")
{
    std::mt19937 g(2026);
    for (const auto& cf : random_configs(40, 99)) {
        check_against_reference<vf::ncdhw_t>(cf, g);
        check_against_reference<vf::ndhwc_t>(cf, g);
        check_against_reference<vf::nCdhw16c_t>(cf, g);
    }
}

TEST_CASE("static C and dynamic C give identical bits", "[bn][numerics][static]")
{
    std::mt19937 g(4);
    static_equals_dynamic<1, vf::ncdhw_t>(g);
    static_equals_dynamic<3, vf::ncdhw_t>(g);
    static_equals_dynamic<17, vf::ncdhw_t>(g);
    static_equals_dynamic<64, vf::ncdhw_t>(g);
    static_equals_dynamic<1, vf::ndhwc_t>(g);
    static_equals_dynamic<3, vf::ndhwc_t>(g);
    static_equals_dynamic<17, vf::ndhwc_t>(g);
    static_equals_dynamic<64, vf::ndhwc_t>(g);
    static_equals_dynamic<3, vf::nCdhw16c_t>(g);
    static_equals_dynamic<17, vf::nCdhw16c_t>(g);
    static_equals_dynamic<64, vf::nCdhw16c_t>(g);
}

TEST_CASE("NCDHW, NDHWC and nCdhw16c agree", "[bn][numerics][layout]")
{
    std::mt19937 g(8);
    for (const auto& cf : random_configs(15, 5)) {
        const auto x = randn(numel(cf.s), g, -2.0, 3.0), dy = randn(numel(cf.s), g);
        vf::BatchNorm3d<> a(cf.s[1]), b(cf.s[1]), c(cf.s[1]);
        const auto ta = trace<vf::ncdhw_t>(a, x, dy, cf.s, cf.relu);
        const auto tb = trace<vf::ndhwc_t>(b, x, dy, cf.s, cf.relu);
        const auto tc = trace<vf::nCdhw16c_t>(c, x, dy, cf.s, cf.relu);
        for (std::size_t k = 0; k < ta.size(); ++k) {
            double scale = 1e-30;
            for (float v : ta[k]) scale = std::max(scale, static_cast<double>(std::abs(v)));
            for (std::size_t i = 0; i < ta[k].size(); ++i) {
                CHECK_NEAR(ta[k][i], tb[k][i], 2e-6 * scale);
                CHECK_NEAR(ta[k][i], tc[k][i], 2e-6 * scale);
            }
        }
    }
}

TEST_CASE("in place equals out of place, forward and backward", "[bn][numerics][inplace]")
{
    std::mt19937 g(9);
    const sizes5 s{2, 5, 3, 3, 7};
    const auto x = randn(numel(s), g, 0.5, 1.5), dy = randn(numel(s), g);
    for (const bool relu : {false, true}) {
        vf::BatchNorm3d<> a(5), b(5);
        bn_run<vf::ndhwc_t> r(x, s);
        const auto y = r.forward(a, relu);
        const auto dx = r.backward(a, dy, relu);
        // In place forward: Y is X.
        auto inplace = to_layout<vf::ndhwc_t>(x, s);
        auto V = view_of<vf::ndhwc_t>(inplace.data(), s);
        if (relu) b.forward(V, V, vf::relu);
        else b.forward(V, V);
        REQUIRE(same_bits(from_layout<vf::ndhwc_t>(inplace, s), y));
        REQUIRE(same_bits(vec(a.running_var()), vec(b.running_var())));
        // In place backward: dX is dY.
        vf::BatchNorm3d<> c(5);
        bn_run<vf::ndhwc_t> r2(x, s);
        r2.forward(c, relu);
        auto d = to_layout<vf::ndhwc_t>(dy, s);
        auto D = view_of<vf::ndhwc_t>(d.data(), s);
        if (relu) c.backward(view_of<vf::ndhwc_t>(r2.x.data(), s), D, D, vf::relu);
        else c.backward(view_of<vf::ndhwc_t>(r2.x.data(), s), D, D);
        REQUIRE(same_bits(from_layout<vf::ndhwc_t>(d, s), dx));
        REQUIRE(same_bits(vec(a.weight_grad()), vec(c.weight_grad())));
    }
}

TEST_CASE("finite differences confirm the backward", "[bn][numerics][gradcheck]")
{
    // loss = sum(dy * y(x, w, b)); central differences of the float module, loss in double.
    std::mt19937 g(10);
    for (const bool train : {true, false})
        for (const bool relu : {false, true}) {
            INFO("train " << train << " relu " << relu);
            const sizes5 s{2, 3, 2, 3, 4};
            const auto x = randn(numel(s), g, 0.3, 1.2);
            auto dy = randn(numel(s), g);
            const std::vector<float> w{1.3f, 0.7f, -0.9f}, b{0.2f, -0.1f, 0.4f};
            if (relu) {
                // The loss ignores outputs whose pre-activation is within 0.05 of the kink, so no
                // perturbation below moves a counted output across it (differences stay valid).
                std::vector<float> rm{0.f, 0.4f, 0.f}, rv{1.f, 1.f, 2.f};
                reference ref;
                ref.forward(x, s, w, b, train, rm, rv, 1e-5, false);
                for (std::size_t i = 0; i < dy.size(); ++i)
                    if (std::abs(ref.pre[i]) < 0.05) dy[i] = 0.f;
            }
            auto make = [&] {
                vf::BatchNorm3d<> bn(3, 1e-5, 0.1);
                std::copy(w.begin(), w.end(), bn.weight().begin());
                std::copy(b.begin(), b.end(), bn.bias().begin());
                bn.running_mean()[1] = 0.4f;
                bn.running_var()[2] = 2.f;
                bn.train(train);
                return bn;
            };
            auto loss = [&](const std::vector<float>& xx, const std::vector<float>& ww, const std::vector<float>& bb) {
                auto bn = make();
                std::copy(ww.begin(), ww.end(), bn.weight().begin());
                std::copy(bb.begin(), bb.end(), bn.bias().begin());
                bn_run<vf::ncdhw_t> r(xx, s);
                const auto y = r.forward(bn, relu);
                double l = 0;
                for (std::size_t i = 0; i < y.size(); ++i) l += static_cast<double>(dy[i]) * y[i];
                return l;
            };
            auto bn = make();
            bn_run<vf::ncdhw_t> r(x, s);
            const auto y = r.forward(bn, relu);
            const auto dx = r.backward(bn, dy, relu);
            const float h = 1e-2f;
            std::uniform_int_distribution<index_t> pick(0, numel(s) - 1);
            int checked = 0;
            for (int t = 0; t < 12; ++t) {
                const index_t i = pick(g);
                auto xp = x, xm = x;
                xp[i] += h;
                xm[i] -= h;
                const double fd = (loss(xp, w, b) - loss(xm, w, b)) / (static_cast<double>(xp[i]) - xm[i]);
                CHECK_NEAR(dx[i], fd, 2e-2 * (1 + std::abs(fd)));
                ++checked;
            }
            REQUIRE(checked == 12);
            REQUIRE(y.size() == x.size());
            for (index_t c = 0; c < 3; ++c) {
                auto wp = w, wm = w, bp = b, bm = b;
                wp[c] += h, wm[c] -= h, bp[c] += h, bm[c] -= h;
                const double fdw = (loss(x, wp, b) - loss(x, wm, b)) / (static_cast<double>(wp[c]) - wm[c]);
                const double fdb = (loss(x, w, bp) - loss(x, w, bm)) / (static_cast<double>(bp[c]) - bm[c]);
                CHECK_NEAR(bn.weight_grad()[c], fdw, 2e-2 * (1 + std::abs(fdw)));
                CHECK_NEAR(bn.bias_grad()[c], fdb, 2e-2 * (1 + std::abs(fdb)));
            }
        }
}

TEST_CASE("the float64 reference's backward matches its own finite differences", "[bn][numerics][gradcheck]")
{
    // Validates the reference used above independently of volfuse.
    std::mt19937 g(12);
    const sizes5 s{2, 2, 2, 2, 3};
    const auto x = randn(numel(s), g), dy = randn(numel(s), g);
    const std::vector<float> w{1.5f, -0.5f}, b{0.1f, 0.2f};
    reference ref;
    ref.forward(x, s, w, b, true, {}, {}, 1e-5, false);
    const auto gr = ref.backward(x, dy, w, true, {});
    for (index_t i = 0; i < numel(s); ++i) {
        // Differences in double through the same reference (x as double).
        auto f = [&](double delta) {
            std::vector<double> xd(x.begin(), x.end());
            xd[static_cast<std::size_t>(i)] += delta;
            std::vector<double> mean(2), var(2);
            const double n = static_cast<double>(numel(s) / 2);
            for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t j) { mean[c] += xd[j] / n; });
            for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t j) {
                var[c] += (xd[j] - mean[c]) * (xd[j] - mean[c]) / n;
            });
            double l = 0;
            for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t j) {
                l += dy[j] * ((xd[j] - mean[c]) / std::sqrt(var[c] + 1e-5) * w[c] + b[c]);
            });
            return l;
        };
        CHECK_NEAR(gr.dx[i], (f(1e-6) - f(-1e-6)) / 2e-6, 1e-6);
    }
}

TEST_CASE("hard data: mean 1e4 times the standard deviation", "[bn][numerics][hard]")
{
    std::mt19937 g(14);
    const sizes5 s{4, 3, 8, 16, 16};
    for (const double mean : {1e4, -1e4, 3e5}) {
        const double stddev = std::abs(mean) * 1e-4;
        const auto x = randn(numel(s), g, mean, stddev);
        for (const bool ndhwc : {false, true}) {
            vf::BatchNorm3d<> bn(3, 1e-5, 1.0); // momentum 1: running stats are the batch stats
            const auto y = ndhwc ? bn_run<vf::ndhwc_t>(x, s).forward(bn, false) : bn_run<vf::ncdhw_t>(x, s).forward(bn, false);
            reference ref;
            ref.forward(x, s, {}, {}, true, {}, {}, 1e-5, false);
            for (index_t c = 0; c < 3; ++c) {
                CHECK_NEAR(bn.running_var()[c], ref.unbiased_var(c), 1e-5 * ref.unbiased_var(c));
                CHECK_NEAR(bn.running_mean()[c], ref.mean[c], 0.5 * std::abs(ref.mean[c]) * eps_f);
            }
            double worst = 0;
            for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
                CHECK_NEAR(y[i], ref.y[i], ref.bound(x, {}, {}, c, i));
                worst = std::max(worst, std::abs(y[i] - ref.y[i]));
            });
            // Normalized values are O(1); a naive E[x^2]-E[x]^2 in float would give garbage here.
            CHECK(worst < 2e-3);
        }
    }
}

TEST_CASE("hard data: a channel of 1e7 elements", "[bn][numerics][hard]")
{
    std::mt19937 g(15);
    const sizes5 s{2, 1, 50, 100, 1000}; // 1e7 elements in one channel
    const auto x = randn(numel(s), g, 100.0, 1.0);
    vf::BatchNorm3d<1> bn(1, 1e-5, 1.0);
    bn_run<vf::ncdhw_t> r(x, s);
    const auto y = r.forward(bn, false);
    reference ref;
    ref.forward(x, s, {}, {}, true, {}, {}, 1e-5, false);
    CHECK_NEAR(bn.running_mean()[0], ref.mean[0], 0.5 * 100 * eps_f);
    CHECK_NEAR(bn.running_var()[0], ref.unbiased_var(0), 1e-6);
    double worst = 0;
    for (std::size_t i = 0; i < y.size(); ++i) worst = std::max(worst, std::abs(y[i] - ref.y[i]) / ref.bound(x, {}, {}, 0, static_cast<index_t>(i)));
    CHECK(worst <= 1.0);
    const auto dy = randn(numel(s), g);
    const auto dx = r.backward(bn, dy, false);
    const auto gr = ref.backward(x, dy, {}, true, {});
    double dmax = 0;
    for (std::size_t i = 0; i < dx.size(); ++i) dmax = std::max(dmax, std::abs(dx[i] - gr.dx[i]));
    CHECK(dmax < 1e-5);
}

TEST_CASE("unaligned base pointers give the same bits", "[bn][numerics][alignment]")
{
    std::mt19937 g(16);
    const sizes5 s{2, 17, 2, 3, 5};
    const auto x = randn(numel(s), g, 1.0, 2.0), dy = randn(numel(s), g);
    for (const bool ndhwc : {false, true}) {
        std::vector<std::vector<float>> results;
        for (const index_t shift : {0, 1, 3}) {
            // Buffers whose data starts `shift` floats past an allocation's (aligned) start.
            std::vector<float> xb(x.size() + 4), yb(x.size() + 4), dyb(x.size() + 4), dxb(x.size() + 4);
            const auto xm = ndhwc ? to_layout<vf::ndhwc_t>(x, s) : to_layout<vf::ncdhw_t>(x, s);
            const auto dym = ndhwc ? to_layout<vf::ndhwc_t>(dy, s) : to_layout<vf::ncdhw_t>(dy, s);
            std::copy(xm.begin(), xm.end(), xb.begin() + shift);
            std::copy(dym.begin(), dym.end(), dyb.begin() + shift);
            vf::BatchNorm3d<17> bn(17);
            auto run = [&](auto layout) {
                using L = decltype(layout);
                auto X = view_of<L>(xb.data() + shift, s);
                bn.forward(X, view_of<L>(yb.data() + shift, s), vf::relu);
                bn.backward(X, view_of<L>(dyb.data() + shift, s), view_of<L>(dxb.data() + shift, s), vf::relu);
            };
            if (ndhwc) run(vf::ndhwc_t{});
            else run(vf::ncdhw_t{});
            results.push_back(std::vector<float>(yb.begin() + shift, yb.begin() + shift + numel(s)));
            results.push_back(std::vector<float>(dxb.begin() + shift, dxb.begin() + shift + numel(s)));
        }
        for (std::size_t k = 2; k < results.size(); ++k) REQUIRE(same_bits(results[k], results[k % 2]));
    }
}

namespace {
/// A 64-byte-aligned float buffer (as PyTorch's allocator gives), `shift` floats in.
struct aligned_buf {
    std::unique_ptr<float[], void (*)(void*)> mem;
    float* p;
    aligned_buf(const std::vector<float>& v, index_t shift)
        : mem(static_cast<float*>(std::aligned_alloc(64, (v.size() + 16) * sizeof(float))), std::free),
          p(mem.get() + shift)
    {
        std::copy(v.begin(), v.end(), p);
    }
    template <class L>
    std::vector<float> logical(const sizes5& s) const
    {
        std::vector<float> mem(p, p + vf::storage_size<L>(view_of<L>(p, s).shape()));
        return from_layout<L>(mem, s);
    }
};

/// Outputs past kernels::stream_min_bytes are stored non-temporally when they do not
/// alias an input and are aligned: the bits must not change (in place never streams).
template <class L>
void check_streamed_outputs(const sizes5& s, std::mt19937& g)
{
    const index_t C = s[1];
    REQUIRE(numel(s) * 4 >= vf::kernels::stream_min_bytes);
    const auto xm = to_layout<L>(randn(numel(s), g, 0.5, 2.0), s), dym = to_layout<L>(randn(numel(s), g), s);
    const auto n = xm.size();
    const std::vector<float> zeros(n, 0.f);
    for (const bool train : {true, false})
        for (const index_t shift : {0, 1}) { // aligned: streamed stores; shifted: ordinary ones
            auto make = [&] {
                vf::BatchNorm3d<> m(C);
                m.train(train);
                std::fill(m.running_var().begin(), m.running_var().end(), 1.5f);
                return m;
            };
            // Out of place: Y and dX are large and distinct from the inputs.
            auto a = make();
            aligned_buf x(xm, shift), y(zeros, shift), dy(dym, shift), dx(zeros, shift);
            a.forward(view_of<L>(x.p, s), view_of<L>(y.p, s), vf::relu);
            a.backward(view_of<L>(x.p, s), view_of<L>(dy.p, s), view_of<L>(dx.p, s), vf::relu);
            // Forward in place.
            auto b = make();
            aligned_buf xi(xm, shift);
            b.forward(view_of<L>(xi.p, s), view_of<L>(xi.p, s), vf::relu);
            REQUIRE(same_bits(y.logical<L>(s), xi.logical<L>(s)));
            REQUIRE(same_bits(vec(a.running_var()), vec(b.running_var())));
            // Backward with dX = dY.
            auto c = make();
            aligned_buf x3(xm, shift), y3(zeros, shift), d3(dym, shift);
            c.forward(view_of<L>(x3.p, s), view_of<L>(y3.p, s), vf::relu);
            c.backward(view_of<L>(x3.p, s), view_of<L>(d3.p, s), view_of<L>(d3.p, s), vf::relu);
            REQUIRE(same_bits(dx.logical<L>(s), d3.logical<L>(s)));
            REQUIRE(same_bits(vec(a.weight_grad()), vec(c.weight_grad())));
        }
}
} // namespace

TEST_CASE("large outputs stored non-temporally give the same bits as in place", "[bn][numerics][stream]")
{
    std::mt19937 g(17);
    const sizes5 s{2, 17, 8, 128, 121}; // 17 MiB per tensor; C = 17 leaves tails in every layout
    check_streamed_outputs<vf::ncdhw_t>(s, g);
    check_streamed_outputs<vf::ndhwc_t>(s, g);
    check_streamed_outputs<vf::nCdhw16c_t>(s, g);
}
