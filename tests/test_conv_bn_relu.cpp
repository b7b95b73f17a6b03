// ConvBnReLU3d: the fused block against a float64 reference of the unfused chain
// Conv3d -> BatchNorm3d -> ReLU (forward, backward, running statistics; train and eval),
// and against volfuse's own unfused chain.
//
// Tolerances are norm-wise (as PyTorch's own tests compare such chains): each float result
// is a sum of at most K products, K = in * taps (conv) or the channel's element count (BN
// sums, accumulated in double), so its error is at most about K * 2^-24 times the sum of the
// terms' magnitudes.  BN rescales by invstd, which maps the conv output's scale to O(1), so
// the comparison is against max|reference| of each tensor with the factor
// 4 * K * 2^-24 (4: error of z, of the mean, of invstd, of the final fma).
#include "conv_reference.hpp"

namespace {

template <class L>
void check_block(const conv_config& cf, const sizes5& xs, bool train, std::mt19937& g)
{
    chain_reference ref(cf, xs);
    const index_t C = cf.out;
    const auto x = randn(numel(xs), g), w = randn(C * cf.in * ref.conv.taps(), g, 0.0, 0.3), b = randn(C, g);
    const auto gamma = randn(C, g, 1.0, 0.5), beta = randn(C, g, 0.2, 0.5);
    const auto dy = randn(numel(ref.conv.ys), g);
    std::vector<float> rm0(C), rv0(C);
    for (index_t c = 0; c < C; ++c) rm0[c] = 0.1f * static_cast<float>(c % 5), rv0[c] = 1.f + 0.25f * static_cast<float>(c % 3);

    vf::Conv3d<> conv(cf.in, cf.out, cf.k, cf.s, cf.p, cf.dil, 1, cf.bias);
    std::copy(w.begin(), w.end(), conv.weight().begin());
    if (cf.bias) std::copy(b.begin(), b.end(), conv.bias().begin());
    vf::BatchNorm3d<> bn(C, 1e-5, 0.1);
    std::copy(gamma.begin(), gamma.end(), bn.weight().begin());
    std::copy(beta.begin(), beta.end(), bn.bias().begin());
    std::copy(rm0.begin(), rm0.end(), bn.running_mean().begin());
    std::copy(rv0.begin(), rv0.end(), bn.running_var().begin());
    vf::ConvBnReLU3d<> block(std::move(conv), std::move(bn));
    block.train(train);

    auto xm = to_layout<L>(x, xs), dym = to_layout<L>(dy, ref.conv.ys);
    auto ym = to_layout<L>(std::vector<float>(dy.size(), NAN), ref.conv.ys);
    auto dxm = to_layout<L>(std::vector<float>(x.size(), NAN), xs);
    block.forward(view_of<L>(xm.data(), xs), view_of<L>(ym.data(), ref.conv.ys));
    block.backward(view_of<L>(xm.data(), xs), view_of<L>(dym.data(), ref.conv.ys), view_of<L>(dxm.data(), xs));
    const auto y = from_layout<L>(ym, ref.conv.ys), dx = from_layout<L>(dxm, xs);
    REQUIRE(padding_untouched<L>(ym, ref.conv.ys));
    REQUIRE(padding_untouched<L>(dxm, xs));

    ref.run(x, w, cf.bias ? b : std::vector<float>(C, 0.f), gamma, beta, {rm0.begin(), rm0.end()},
            {rv0.begin(), rv0.end()}, train, 1e-5, 0.1, dy, &y);
    const index_t n = numel(ref.conv.ys) / C;
    const double K = static_cast<double>(std::max(cf.in * ref.conv.taps(), n)), tol = 4 * K * 0x1p-24;
    INFO("train " << train << " tol " << tol);
    CHECK(close(y, ref.y, tol));
    CHECK(close(dx, ref.dx, tol));
    CHECK(close(vec(block.conv().weight_grad()), ref.dw, tol));
    // In training the conv bias's gradient is a sum of dz that cancels to 0 exactly (BN
    // removes the mean): compare against the size of its terms, sum |dz| per channel.
    std::vector<double> dz_mag(C, 0.0);
    for (std::size_t i = 0; i < ref.dz.size(); ++i) dz_mag[(i / (numel(ref.conv.ys) / C / xs[0])) % C] += std::abs(ref.dz[i]);
    if (cf.bias) CHECK(close(vec(block.conv().bias_grad()), ref.db, tol, max_abs(dz_mag)));
    CHECK(close(vec(block.bn().weight_grad()), ref.gamma_grad, tol));
    CHECK(close(vec(block.bn().bias_grad()), ref.beta_grad, tol));
    if (train) {
        CHECK(close(vec(block.bn().running_mean()), ref.rm, tol));
        CHECK(close(vec(block.bn().running_var()), ref.rv, tol));
        CHECK(block.bn().num_batches_tracked() == 1);
    } else {
        CHECK(same_bits(vec(block.bn().running_mean()), rm0));
        CHECK(block.bn().num_batches_tracked() == 0);
    }
}

} // namespace

TEST_CASE("ConvBnReLU3d matches a float64 Conv3d -> BatchNorm3d -> ReLU chain", "[block][numerics]")
{
    std::mt19937 g(31);
    const std::pair<conv_config, sizes5> cases[] = {
        {{3, 16, {3, 3, 3}, 1, 1}, {2, 3, 4, 5, 6}},
        {{5, 17, {3, 1, 2}, {2, 1, 1}, {1, 0, 1}, 1, false}, {2, 5, 5, 4, 9}},
        {{8, 40, {2, 2, 2}, 1, 0, {1, 2, 1}}, {3, 8, 4, 6, 5}},
        {{4, 70, {3, 3, 3}, 1, 1}, {1, 4, 3, 4, 8}}, // past one block of packed weights (BN folded into both)
    };
    for (const auto& [cf, xs] : cases)
        for (bool train : {true, false}) {
            check_block<vf::ndhwc_t>(cf, xs, train, g);
            check_block<vf::ncdhw_t>(cf, xs, train, g);
            check_block<vf::nCdhw16c_t>(cf, xs, train, g);
        }
}

TEST_CASE("the fused block and the unfused volfuse chain agree", "[block][numerics]")
{
    // Training: the statistics come from the conv's epilogue (Chan's merge) instead of
    // BatchNorm3d's two passes; eval: BN folded into the conv.  Both differ from the unfused
    // chain by rounding only.
    std::mt19937 g(32);
    const sizes5 xs{2, 6, 5, 6, 7};
    const auto x = randn(numel(xs), g);
    for (bool train : {true, false}) {
        vf::Conv3d<> conv(6, 24, 3, 1, 1);
        vf::BatchNorm3d<> bn(24);
        for (auto& v : bn.weight()) v = 0.5f + static_cast<float>(&v - bn.weight().data()) * 0.05f;
        for (auto& v : bn.running_var()) v = 2.f;
        vf::Conv3d<> conv2 = conv;
        vf::BatchNorm3d<> bn2 = bn;
        vf::ConvBnReLU3d<> block(std::move(conv2), std::move(bn2));
        block.train(train);
        bn.train(train);
        const sizes5 ys = block.output_sizes(xs);
        std::vector<float> z(numel(ys)), y1(numel(ys)), y2(numel(ys));
        auto X = view_of<vf::ndhwc_t>(const_cast<float*>(x.data()), xs);
        conv.forward(X, view_of<vf::ndhwc_t>(z.data(), ys));
        bn.forward(view_of<vf::ndhwc_t>(z.data(), ys), view_of<vf::ndhwc_t>(y1.data(), ys), vf::relu);
        block.forward(X, view_of<vf::ndhwc_t>(y2.data(), ys));
        double worst = 0, scale = 0;
        for (std::size_t i = 0; i < y1.size(); ++i) {
            worst = std::max(worst, std::abs(static_cast<double>(y1[i]) - y2[i]));
            scale = std::max(scale, std::abs(static_cast<double>(y1[i])));
        }
        INFO("train " << train << ": max |unfused - fused| = " << worst << " of " << scale);
        CHECK(worst <= 8 * 6 * 27 * 0x1p-24 * scale);
        for (index_t c = 0; c < 24; ++c) {
            CHECK(std::abs(bn.running_mean()[c] - block.bn().running_mean()[c]) <= 1e-6);
            CHECK(std::abs(bn.running_var()[c] - block.bn().running_var()[c]) <= 1e-6 * bn.running_var()[c]);
        }
    }
}

TEST_CASE("the block's moments stay exact when the conv output's mean is 1e4 times its std", "[block][numerics][hard]")
{
    // Both paths see the same float conv output z (the same kernel writes it); the block sums
    // it around a shift in its epilogue, BatchNorm3d sums it in two passes (ATen's way).
    // With momentum 1 the running statistics are the batch's: they must agree to a few ulps.
    std::mt19937 g(33);
    const sizes5 xs{2, 4, 6, 7, 9};
    auto x = randn(numel(xs), g);
    vf::Conv3d<> conv(4, 20, 3, 1, 1);
    for (auto& b : conv.bias()) b = 1e4f;
    vf::BatchNorm3d<> bn(20, 1e-5, 1.0);
    vf::ConvBnReLU3d<> block{vf::Conv3d<>(conv), vf::BatchNorm3d<>(bn)};
    const sizes5 ys = block.output_sizes(xs);
    std::vector<float> z(numel(ys)), y1(numel(ys)), y2(numel(ys));
    auto X = view_of<vf::ndhwc_t>(x.data(), xs);
    conv.forward(X, view_of<vf::ndhwc_t>(z.data(), ys));
    bn.forward(view_of<vf::ndhwc_t>(z.data(), ys), view_of<vf::ndhwc_t>(y1.data(), ys), vf::relu);
    block.forward(X, view_of<vf::ndhwc_t>(y2.data(), ys));
    for (index_t c = 0; c < 20; ++c) {
        INFO("channel " << c << ": running_var " << bn.running_var()[c] << " vs " << block.bn().running_var()[c]);
        CHECK(std::abs(bn.running_mean()[c] - block.bn().running_mean()[c]) <= 4 * eps_f * 1e4);
        CHECK(std::abs(bn.running_var()[c] - block.bn().running_var()[c]) <= 4 * eps_f * bn.running_var()[c]);
    }
    double worst = 0;
    for (std::size_t i = 0; i < y1.size(); ++i) worst = std::max(worst, std::abs(static_cast<double>(y1[i]) - y2[i]));
    CHECK(worst <= 1e-5);
}

TEST_CASE("the block's backward without dX gives backward's grads and runs no grad input", "[block][semantics]")
{
    // A network's first layer: autograd computes no input grad, and neither does this call.
    // Both layouts, train and eval; the grads are bitwise those of backward(X, dY, dX).
    std::mt19937 g(35);
    const sizes5 xs{2, 3, 5, 6, 7};
    const auto x = randn(numel(xs), g);
    auto run = [&]<class L>(L, bool train) {
        vf::ConvBnReLU3d<> with(vf::Conv3d<>(3, 20, 3, 1, 1), vf::BatchNorm3d<>(20));
        vf::ConvBnReLU3d<> without = with;
        const sizes5 ys = with.output_sizes(xs);
        const auto dy = randn(numel(ys), g);
        auto xm = to_layout<L>(x, xs), dym = to_layout<L>(dy, ys);
        std::vector<float> y1(static_cast<std::size_t>(numel(ys))), y2 = y1, dx(xm.size(), 5.f);
        for (auto* b : {&with, &without}) b->train(train);
        const auto X = view_of<L>(xm.data(), xs);
        with.forward(X, view_of<L>(y1.data(), ys));
        without.forward(X, view_of<L>(y2.data(), ys));
        with.backward(X, view_of<L>(dym.data(), ys), view_of<L>(dx.data(), xs));
        without.backward(X, view_of<L>(dym.data(), ys));
        REQUIRE(same_bits(y1, y2));
        REQUIRE(same_bits(vec(with.conv().weight_grad()), vec(without.conv().weight_grad())));
        REQUIRE(same_bits(vec(with.conv().bias_grad()), vec(without.conv().bias_grad())));
        REQUIRE(same_bits(vec(with.bn().weight_grad()), vec(without.bn().weight_grad())));
        REQUIRE(same_bits(vec(with.bn().bias_grad()), vec(without.bn().bias_grad())));
        bool any_nonzero = false;
        for (float v : without.conv().weight_grad()) any_nonzero |= v != 0.f;
        REQUIRE(any_nonzero);
    };
    for (bool train : {true, false}) {
        run(vf::ndhwc_t{}, train);
        run(vf::ncdhw_t{}, train);
    }
}

TEST_CASE("forward(X, Y, Z) keeps the conv output in Z: forward(X, Y)'s bits, and backward reads Z", "[block][semantics]")
{
    // What PyTorch's fused operator does (it returns z for autograd): Z holds the conv output
    // conv_output() holds after forward(X, Y), Y and every grad are the same bits, and the
    // backward after forward(X, Y, Z) reads z from Z (changing Z changes the grads).  With
    // running statistics Z is not written.  Both layouts of X.
    std::mt19937 g(37);
    const sizes5 xs{2, 3, 5, 6, 7};
    const auto x = randn(numel(xs), g);
    auto run = [&]<class L>(L, bool train) {
        INFO(L::name << " train " << train);
        vf::ConvBnReLU3d<> own(vf::Conv3d<>(3, 20, 3, 1, 1), vf::BatchNorm3d<>(20));
        vf::ConvBnReLU3d<> into = own;
        const sizes5 ys = own.output_sizes(xs);
        const auto dy = randn(numel(ys), g);
        auto xm = to_layout<L>(x, xs), dym = to_layout<L>(dy, ys);
        std::vector<float> y1(static_cast<std::size_t>(numel(ys))), y2 = y1, z(y1.size(), 3.f), dx1(xm.size()),
            dx2 = dx1;
        for (auto* b : {&own, &into}) b->train(train);
        const auto X = view_of<L>(xm.data(), xs);
        own.forward(X, view_of<L>(y1.data(), ys));
        into.forward(X, view_of<L>(y2.data(), ys), vf::ndhwc_view(z.data(), ys[0], ys[1], ys[2], ys[3], ys[4]));
        REQUIRE(same_bits(y1, y2));
        if (!train) {
            for (float v : z) REQUIRE(v == 3.f);
            REQUIRE(into.conv_output().data() != z.data());
        } else {
            REQUIRE(same_bits(std::vector<float>(own.conv_output().begin(), own.conv_output().end()), z));
            REQUIRE(into.conv_output().data() == z.data());
        }
        own.backward(X, view_of<L>(dym.data(), ys), view_of<L>(dx1.data(), xs));
        into.backward(X, view_of<L>(dym.data(), ys), view_of<L>(dx2.data(), xs));
        REQUIRE(same_bits(dx1, dx2));
        REQUIRE(same_bits(vec(own.conv().weight_grad()), vec(into.conv().weight_grad())));
        REQUIRE(same_bits(vec(own.bn().weight_grad()), vec(into.bn().weight_grad())));
        if (train) {
            // The kept z is Z's memory: another z gives other grads.
            for (float& v : z) v = -v;
            into.backward(X, view_of<L>(dym.data(), ys), view_of<L>(dx2.data(), xs));
            REQUIRE_FALSE(same_bits(dx1, dx2));
        } else {
            for (float v : z) REQUIRE(v == 3.f); // eval's backward recomputes z in its own buffer
        }
        // A later forward(X, Y) keeps z in the module again.
        into.forward(X, view_of<L>(y2.data(), ys));
        REQUIRE(into.conv_output().data() != z.data());
    };
    for (bool train : {true, false}) {
        run(vf::ndhwc_t{}, train);
        run(vf::ncdhw_t{}, train);
    }
}

TEST_CASE("one input channel: NCDHW runs on the caller's memory, with NDHWC's bits", "[block][layout]")
{
    // [N, 1, D, H, W] is the same memory in both layouts: no reorder of X nor of dX, and the
    // results are NDHWC's bit for bit, also when a second forward on other data comes between a
    // forward and its backward's reuse.
    std::mt19937 g(36);
    const sizes5 xs{2, 1, 5, 6, 9};
    auto run = [&]<class L>(L, const std::vector<float>& x, const std::vector<float>& x2, const std::vector<float>& dy) {
        vf::ConvBnReLU3d<> block(vf::Conv3d<>(1, 24, 3, 1, 1), vf::BatchNorm3d<>(24));
        const sizes5 ys = block.output_sizes(xs);
        auto xm = to_layout<L>(x, xs), x2m = to_layout<L>(x2, xs), dym = to_layout<L>(dy, ys);
        std::vector<float> y(static_cast<std::size_t>(numel(ys))), dx(xm.size(), 7.f);
        block.forward(view_of<L>(x2m.data(), xs), view_of<L>(y.data(), ys));
        block.forward(view_of<L>(xm.data(), xs), view_of<L>(y.data(), ys));
        block.backward(view_of<L>(xm.data(), xs), view_of<L>(dym.data(), ys), view_of<L>(dx.data(), xs));
        return std::tuple{from_layout<L>(y, ys), from_layout<L>(dx, xs), vec(block.conv().weight_grad()),
                          vec(block.bn().weight_grad())};
    };
    const auto x = randn(numel(xs), g), x2 = randn(numel(xs), g);
    const auto dy = randn(numel(sizes5{2, 24, 5, 6, 9}), g);
    const auto a = run(vf::ndhwc_t{}, x, x2, dy), b = run(vf::ncdhw_t{}, x, x2, dy);
    REQUIRE(same_bits(std::get<0>(a), std::get<0>(b)));
    REQUIRE(same_bits(std::get<1>(a), std::get<1>(b)));
    REQUIRE(same_bits(std::get<2>(a), std::get<2>(b)));
    REQUIRE(same_bits(std::get<3>(a), std::get<3>(b)));
}
