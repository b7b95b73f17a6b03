// Conv3d's errors: PyTorch's messages, and a failed call changes nothing.
#include "support.hpp"

using Catch::Matchers::Equals;

TEST_CASE("construction errors use PyTorch's messages", "[conv][errors]")
{
    REQUIRE_THROWS_WITH(vf::Conv3d<>(3, 64, 7, 2, 3, 1, 0), Equals("groups must be a positive integer"));
    REQUIRE_THROWS_WITH(vf::Conv3d<>(3, 64, 7, 2, 3, 1, 2), Equals("in_channels must be divisible by groups"));
    REQUIRE_THROWS_WITH(vf::Conv3d<>(4, 63, 7, 2, 3, 1, 2), Equals("out_channels must be divisible by groups"));
    REQUIRE_THROWS_WITH(vf::Conv3d<>(4, 64, 7, 2, 3, 1, 2),
                        Equals("Conv3d: groups=2 is not supported by volfuse (groups=1 only)"));
    REQUIRE_THROWS_WITH(vf::Conv3d<>(-1, 8, 3),
                        Equals("Trying to create tensor with negative dimension -1: [8, -1, 3, 3, 3]"));
    REQUIRE_THROWS_WITH(vf::Conv3d<>(4, 8, 3, 0), Equals("non-positive stride is not supported"));
    REQUIRE_THROWS_WITH(vf::Conv3d<>(4, 8, 3, {1, -1, 1}), Equals("non-positive stride is not supported"));
    REQUIRE_THROWS_WITH(vf::Conv3d<>(4, 8, 3, 1, -1), Equals("negative padding is not supported"));
    REQUIRE_THROWS_WITH(vf::Conv3d<>(4, 8, 3, 1, 0, 0),
                        Equals("dilation should be greater than zero, but got [0, 0, 0]"));
    REQUIRE_THROWS_WITH(vf::Conv3d<>(4, 8, 0),
                        Equals("kernel size should be greater than zero, but got: 0 x 0 x 0 (TxHxW)"));
    REQUIRE_THROWS_WITH(vf::Conv3d<>(4, 0, 3),
                        Equals("Given groups=1, expected weight to be at least 1 at dimension 0, but got weight of "
                               "size [0, 4, 3, 3, 3] instead"));
    using fixed = vf::Conv3d<vf::conv_spec{.in = 4, .out = 8, .kernel = 3}>;
    REQUIRE_THROWS_WITH(fixed(5, 8, 3), Equals("Conv3d<spec>: the spec fixes in_channels = 4, the constructor got 5"));
    REQUIRE_THROWS_WITH(fixed(4, 8, {3, 3, 1}),
                        Equals("Conv3d<spec>: the spec fixes kernel_size[2] = 3, the constructor got (3, 3, 1)"));
}

TEST_CASE("forward and backward errors change nothing", "[conv][errors]")
{
    vf::Conv3d<> conv(3, 8, 3, 1, 0);
    conv.zero_grad();
    const auto w0 = vec(conv.weight());
    std::vector<float> x(2 * 4 * 5 * 5 * 5, 1.f), y(2 * 8 * 3 * 3 * 3, 7.f), small(2 * 3 * 2 * 5 * 5, 1.f);
    REQUIRE_THROWS_WITH(conv.forward(vf::ncdhw_view(x.data(), 2, 4, 5, 5, 5), vf::ncdhw_view(y.data(), 2, 8, 3, 3, 3)),
                        Equals("Given groups=1, weight of size [8, 3, 3, 3, 3], expected input[2, 4, 5, 5, 5] to have "
                               "3 channels, but got 4 channels instead"));
    REQUIRE_THROWS_WITH(
        conv.forward(vf::ncdhw_view(small.data(), 2, 3, 2, 5, 5), vf::ncdhw_view(y.data(), 2, 8, 3, 3, 3)),
        Equals("Calculated padded input size per channel: (2 x 5 x 5). Kernel size: (3 x 3 x 3). Kernel size can't be "
               "greater than actual input size"));
    std::vector<float> x3(2 * 3 * 5 * 5 * 5, 1.f);
    REQUIRE_THROWS_WITH(conv.forward(vf::ncdhw_view(x3.data(), 2, 3, 5, 5, 5), vf::ncdhw_view(y.data(), 2, 8, 3, 3, 4)),
                        Equals("output has shape [2, 8, 3, 3, 4] but Conv3d expects [2, 8, 3, 3, 3] for input "
                               "[2, 3, 5, 5, 5]"));
    REQUIRE_THROWS_WITH(conv.forward(vf::ncdhw_view(x3.data(), 2, 3, 5, 5, 5), vf::ncdhw_view(x3.data(), 2, 8, 3, 3, 3)),
                        Equals("output overlaps input"));
    std::vector<float> dy(y.size(), 1.f), dx(x3.size(), 5.f);
    REQUIRE_THROWS_WITH(conv.backward(vf::ncdhw_view(x3.data(), 2, 3, 5, 5, 5), vf::ncdhw_view(dy.data(), 2, 8, 3, 3, 3),
                                      vf::ncdhw_view(dx.data(), 2, 3, 5, 5, 4)),
                        Equals("grad_input has shape [2, 3, 5, 5, 4] but Conv3d expects [2, 3, 5, 5, 5] for input "
                               "[2, 3, 5, 5, 5]"));
    for (float v : y) REQUIRE(v == 7.f);
    for (float v : dx) REQUIRE(v == 5.f);
    for (float v : conv.weight_grad()) REQUIRE(v == 0.f);
    for (float v : conv.bias_grad()) REQUIRE(v == 0.f);
    REQUIRE(same_bits(vec(conv.weight()), w0));
}

TEST_CASE("nCdhw16c operands: overlaps count the padding lanes", "[conv][errors][layout]")
{
    // Output [1, 4, 3, 3, 3] in nCdhw16c occupies 16 lanes per pixel (27 * 16 floats), four
    // times its elements: an input placed past its 108 elements but inside its storage overlaps.
    vf::Conv3d<> conv(3, 4, 3, 1, 1);
    std::vector<float> buf(27 * 16 + 27 * 16, 2.f);
    const auto before = buf;
    auto Y = vf::nCdhw16c_view(buf.data(), 1, 4, 3, 3, 3);
    auto X = vf::nCdhw16c_view(buf.data() + 27 * 8, 1, 3, 3, 3, 3);
    REQUIRE_THROWS_WITH(conv.forward(X, Y), Equals("output overlaps input"));
    REQUIRE_THROWS_WITH(conv.backward_input(Y, X), Equals("grad_output overlaps grad_input"));
    REQUIRE(same_bits(buf, before));
}

TEST_CASE("ConvBnReLU3d errors change nothing", "[block][errors]")
{
    REQUIRE_THROWS_WITH(vf::ConvBnReLU3d<>(vf::Conv3d<>(3, 8, 3), vf::BatchNorm3d<>(7)),
                        Equals("ConvBnReLU3d: BatchNorm3d has 7 features but the Conv3d has 8 output channels"));
    vf::ConvBnReLU3d<> block(vf::Conv3d<>(3, 8, 3, 1, 1), vf::BatchNorm3d<>(8));
    std::vector<float> x(1 * 3 * 1 * 1 * 1, 1.f), y(1 * 8 * 1 * 1 * 1, 7.f);
    // One value per channel in training: BatchNorm3d's error, raised before the conv runs or
    // any statistic changes.
    REQUIRE_THROWS_WITH(block.forward(vf::ncdhw_view(x.data(), 1, 3, 1, 1, 1), vf::ncdhw_view(y.data(), 1, 8, 1, 1, 1)),
                        Equals("Expected more than 1 value per channel when training, got input size [1, 8, 1, 1, 1]"));
    for (float v : y) REQUIRE(v == 7.f);
    REQUIRE(block.bn().num_batches_tracked() == 0);
    for (float v : block.bn().running_mean()) REQUIRE(v == 0.f);
    for (float v : block.bn().running_var()) REQUIRE(v == 1.f);
    // Wrong input channels: the conv's message.
    std::vector<float> x4(2 * 4 * 3 * 3 * 3, 1.f), y2(2 * 8 * 3 * 3 * 3, 7.f);
    REQUIRE_THROWS_WITH(block.forward(vf::ncdhw_view(x4.data(), 2, 4, 3, 3, 3), vf::ncdhw_view(y2.data(), 2, 8, 3, 3, 3)),
                        Equals("Given groups=1, weight of size [8, 3, 3, 3, 3], expected input[2, 4, 3, 3, 3] to have "
                               "3 channels, but got 4 channels instead"));
    REQUIRE(block.bn().num_batches_tracked() == 0);
    // Backward without a training forward on this X.
    std::vector<float> x3(2 * 3 * 3 * 3 * 3, 1.f), dy(y2.size(), 1.f), dx(x3.size(), 5.f);
    REQUIRE_THROWS_WITH(block.backward(vf::ncdhw_view(x3.data(), 2, 3, 3, 3, 3), vf::ncdhw_view(dy.data(), 2, 8, 3, 3, 3),
                                       vf::ncdhw_view(dx.data(), 2, 3, 3, 3, 3)),
                        Equals("ConvBnReLU3d::backward: X is not the input of the last training forward (run "
                               "forward(X, Y) in training mode first)"));
    REQUIRE_THROWS_WITH(block.backward(vf::ncdhw_view(x3.data(), 2, 3, 3, 3, 3), vf::ncdhw_view(dy.data(), 2, 8, 3, 3, 2),
                                       vf::ncdhw_view(dx.data(), 2, 3, 3, 3, 3)),
                        Equals("grad_output has shape [2, 8, 3, 3, 2] but ConvBnReLU3d expects [2, 8, 3, 3, 3] for "
                               "input [2, 3, 3, 3, 3]"));
    for (float v : dx) REQUIRE(v == 5.f);
    for (float v : block.conv().weight_grad()) REQUIRE(v == 0.f);
    for (float v : block.bn().weight_grad()) REQUIRE(v == 0.f);
}

TEST_CASE("ConvBnReLU3d::forward(X, Y, Z) checks Z and changes nothing when it is wrong", "[block][errors]")
{
    vf::ConvBnReLU3d<> block(vf::Conv3d<>(3, 8, 3, 1, 1), vf::BatchNorm3d<>(8));
    std::vector<float> x(2 * 3 * 3 * 3 * 3, 1.f), y(2 * 8 * 3 * 3 * 3, 7.f), z(y.size(), 9.f);
    x[5] = 2.f;
    const auto X = vf::ncdhw_view(x.data(), 2, 3, 3, 3, 3);
    const auto Y = vf::ncdhw_view(y.data(), 2, 8, 3, 3, 3);
    auto unchanged = [&] {
        for (float v : y) REQUIRE(v == 7.f);
        for (float v : z) REQUIRE(v == 9.f);
        REQUIRE(block.bn().num_batches_tracked() == 0);
        for (float v : block.bn().running_mean()) REQUIRE(v == 0.f);
    };
    REQUIRE_THROWS_WITH(block.forward(X, Y, vf::ndhwc_view(z.data(), 2, 8, 3, 3, 2)),
                        Equals("conv_output has shape [2, 8, 3, 3, 2] but ConvBnReLU3d expects [2, 8, 3, 3, 3] for "
                               "input [2, 3, 3, 3, 3]"));
    unchanged();
    REQUIRE_THROWS_WITH(block.forward(X, Y, vf::ndhwc_view(y.data(), 2, 8, 3, 3, 3)), Equals("conv_output overlaps output"));
    unchanged();
    std::vector<float> big(x.size() + z.size(), 9.f);
    const auto Xb = vf::ncdhw_view(big.data(), 2, 3, 3, 3, 3);
    REQUIRE_THROWS_WITH(block.forward(Xb, Y, vf::ndhwc_view(big.data() + 10, 2, 8, 3, 3, 3)),
                        Equals("conv_output overlaps input"));
    unchanged();
    // X's own error comes first, as forward(X, Y) reports it.
    std::vector<float> x4(2 * 4 * 3 * 3 * 3, 1.f);
    REQUIRE_THROWS_WITH(block.forward(vf::ncdhw_view(x4.data(), 2, 4, 3, 3, 3), Y, vf::ndhwc_view(z.data(), 1, 1, 1, 1, 1)),
                        Equals("Given groups=1, weight of size [8, 3, 3, 3, 3], expected input[2, 4, 3, 3, 3] to have "
                               "3 channels, but got 4 channels instead"));
    unchanged();
    // An error inside forward (Y of the wrong shape) leaves the block keeping z where it did:
    // the backward of the earlier forward(X, Y) still reads the module's own z.
    std::vector<float> y1(y.size()), dy(y.size(), 1.f), dx1(x.size()), dx2(x.size());
    block.forward(X, vf::ncdhw_view(y1.data(), 2, 8, 3, 3, 3));
    block.backward(X, vf::ncdhw_view(dy.data(), 2, 8, 3, 3, 3), vf::ncdhw_view(dx1.data(), 2, 3, 3, 3, 3));
    std::vector<float> ybad(2 * 8 * 3 * 3 * 2);
    REQUIRE_THROWS(block.forward(X, vf::ncdhw_view(ybad.data(), 2, 8, 3, 3, 2), vf::ndhwc_view(z.data(), 2, 8, 3, 3, 3)));
    for (float v : z) REQUIRE(v == 9.f);
    REQUIRE(block.conv_output().data() != z.data());
    block.backward(X, vf::ncdhw_view(dy.data(), 2, 8, 3, 3, 3), vf::ncdhw_view(dx2.data(), 2, 3, 3, 3, 3));
    REQUIRE(dx1 == dx2);
}

TEST_CASE("ConvBnReLU3d::backward checks every argument before any grad changes", "[block][errors]")
{
    // A bad dX (null, overlapping dY) is found before the BatchNorm3d's grads are accumulated:
    // a retry after the fix must not count anything twice.
    for (bool ncdhw : {false, true}) {
        vf::ConvBnReLU3d<> block(vf::Conv3d<>(3, 8, 3, 1, 1), vf::BatchNorm3d<>(8));
        std::vector<float> x(2 * 3 * 3 * 3 * 3), y(2 * 8 * 3 * 3 * 3), dy(y.size(), 1.f), dx(x.size(), 5.f);
        for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7) - 3.f;
        auto run = [&](auto make) {
            block.forward(make(x.data(), 3), make(y.data(), 8));
            REQUIRE_THROWS_WITH(block.backward(make(x.data(), 3), make(dy.data(), 8), make(static_cast<float*>(nullptr), 3)),
                                Equals("grad_input data pointer is null"));
            REQUIRE_THROWS_WITH(block.backward(make(x.data(), 3), make(dy.data(), 8), make(x.data(), 3)),
                                Equals("grad_input overlaps input"));
            REQUIRE_THROWS_WITH(block.backward(make(x.data(), 3), make(static_cast<float*>(nullptr), 8), make(dx.data(), 3)),
                                Equals("grad_output data pointer is null"));
            REQUIRE_THROWS_WITH(block.backward(make(x.data(), 3), make(static_cast<float*>(nullptr), 8)),
                                Equals("grad_output data pointer is null"));
        };
        if (ncdhw) run([](float* p, vf::index_t c) { return vf::ncdhw_view(p, 2, c, 3, 3, 3); });
        else run([](float* p, vf::index_t c) { return vf::ndhwc_view(p, 2, c, 3, 3, 3); });
        for (float v : dx) REQUIRE(v == 5.f);
        for (float v : block.conv().weight_grad()) REQUIRE(v == 0.f);
        for (float v : block.conv().bias_grad()) REQUIRE(v == 0.f);
        for (float v : block.bn().weight_grad()) REQUIRE(v == 0.f);
        for (float v : block.bn().bias_grad()) REQUIRE(v == 0.f);
    }
}

TEST_CASE("Conv3d backward_input and backward_weight validate like backward", "[conv][errors]")
{
    vf::Conv3d<> conv(3, 4, 3, 1, 1);
    std::vector<float> x(2 * 3 * 3 * 3 * 3, 1.f), dy(2 * 4 * 3 * 3 * 3, 1.f), dx(x.size(), 5.f);
    REQUIRE_THROWS_WITH(conv.backward_input(vf::ndhwc_view(dy.data(), 2, 4, 3, 3, 2), vf::ndhwc_view(dx.data(), 2, 3, 3, 3, 3)),
                        Equals("grad_output has shape [2, 4, 3, 3, 2] but Conv3d expects [2, 4, 3, 3, 3] for input "
                               "[2, 3, 3, 3, 3]"));
    REQUIRE_THROWS_WITH(conv.backward_input(vf::ndhwc_view(dy.data(), 2, 4, 3, 3, 3), vf::ndhwc_view(dy.data(), 2, 3, 3, 3, 3)),
                        Equals("grad_output overlaps grad_input"));
    REQUIRE_THROWS_WITH(conv.backward_input(vf::ndhwc_view(dy.data(), 2, 4, 3, 3, 3),
                                            vf::ndhwc_view(static_cast<float*>(nullptr), 2, 3, 3, 3, 3)),
                        Equals("grad_input data pointer is null"));
    REQUIRE_THROWS_WITH(conv.backward_weight(vf::ndhwc_view(x.data(), 2, 2, 3, 3, 3), vf::ndhwc_view(dy.data(), 2, 4, 3, 3, 3)),
                        Equals("Given groups=1, weight of size [4, 3, 3, 3, 3], expected input[2, 2, 3, 3, 3] to have 3 "
                               "channels, but got 2 channels instead"));
    REQUIRE_THROWS_WITH(conv.backward_weight(vf::ndhwc_view(x.data(), 2, 3, 3, 3, 3),
                                             vf::ndhwc_view(static_cast<float*>(nullptr), 2, 4, 3, 3, 3)),
                        Equals("grad_output data pointer is null"));
    for (float v : dx) REQUIRE(v == 5.f);
    for (float v : conv.weight_grad()) REQUIRE(v == 0.f);
    for (float v : conv.bias_grad()) REQUIRE(v == 0.f);
}
