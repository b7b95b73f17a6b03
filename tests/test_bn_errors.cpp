// One test per error: the message (PyTorch's wording where it has one) and that
// nothing changed: module state, outputs and gradients are exactly as before.
#include "support.hpp"

namespace {

/// A trained module with non-trivial state, plus buffers for one call.
struct fixture {
    sizes5 s{2, 4, 2, 3, 3};
    std::mt19937 g{31};
    std::vector<float> x = randn(numel(s), g), y = randn(numel(s), g), dy = randn(numel(s), g),
                       dx = randn(numel(s), g);
    vf::BatchNorm3d<> bn{4};
    fixture()
    {
        auto X = view_of<vf::ncdhw_t>(x.data(), s);
        bn.forward(X, view_of<vf::ncdhw_t>(y.data(), s), vf::relu);
        bn.backward(X, view_of<vf::ncdhw_t>(dy.data(), s), view_of<vf::ncdhw_t>(dx.data(), s), vf::relu);
    }
    auto X() { return view_of<vf::ncdhw_t>(x.data(), s); }
    auto Y() { return view_of<vf::ncdhw_t>(y.data(), s); }
    auto DY() { return view_of<vf::ncdhw_t>(dy.data(), s); }
    auto DX() { return view_of<vf::ncdhw_t>(dx.data(), s); }
};

/// Checks that `call` throws vf::error with exactly `message` and changes nothing.
template <class BN, class F>
void require_error(BN& bn, std::vector<std::vector<float>*> buffers, F&& call, const std::string& message)
{
    const module_state<BN> before(bn);
    std::vector<std::vector<float>> copies;
    for (auto* b : buffers) copies.push_back(*b);
    REQUIRE_THROWS_MATCHES(call(), vf::error, Catch::Matchers::Message(message));
    REQUIRE(module_state<BN>(bn) == before);
    for (std::size_t i = 0; i < buffers.size(); ++i) REQUIRE(same_bits(*buffers[i], copies[i]));
}

} // namespace

TEST_CASE("error: input that is not 5-D", "[errors]")
{
    fixture f;
    const std::vector<index_t> four{2, 4, 3, 3};
    require_error(f.bn, {&f.y}, [&] { f.bn.forward(vf::ncdhw_view(f.x.data(), std::span<const index_t>(four)), f.Y()); },
                  "expected 5D input (got 4D input)");
}

TEST_CASE("error: channel count differs from running_mean (tracking on)", "[errors]")
{
    fixture f;
    std::vector<float> x5(5 * 4), y5(5 * 4);
    auto X = vf::ncdhw_view(x5.data(), 2, 5, 1, 1, 2), Y = vf::ncdhw_view(y5.data(), 2, 5, 1, 1, 2);
    require_error(f.bn, {&y5}, [&] { f.bn.forward(X, Y); }, "running_mean should contain 5 elements not 4");
    f.bn.eval();
    require_error(f.bn, {&y5}, [&] { f.bn.forward(X, Y); }, "running_mean should contain 5 elements not 4");
    vf::BatchNorm3d<4> st(4);
    require_error(st, {&y5}, [&] { st.forward(X, Y); }, "running_mean should contain 5 elements not 4");
}

TEST_CASE("error: channel count differs from weight (tracking off)", "[errors]")
{
    fixture f;
    vf::BatchNorm3d<> bn(4, 1e-5, 0.1, true, false);
    std::vector<float> x3(3 * 8), y3(3 * 8, 7.f);
    require_error(bn, {&y3}, [&] { bn.forward(vf::ndhwc_view(x3.data(), 1, 3, 2, 2, 2), vf::ndhwc_view(y3.data(), 1, 3, 2, 2, 2)); },
                  "weight should contain 3 elements not 4");
}

TEST_CASE("error: static C module without parameters given another C", "[errors]")
{
    vf::BatchNorm3d<4> bn(4, 1e-5, 0.1, false, false);
    std::vector<float> x3(3 * 8), y3(3 * 8, 7.f);
    require_error(bn, {&y3}, [&] { bn.forward(vf::ncdhw_view(x3.data(), 1, 3, 2, 2, 2), vf::ncdhw_view(y3.data(), 1, 3, 2, 2, 2)); },
                  "BatchNorm3d<4>: kernels are specialized for 4 channels, got input with 3 channels");
}

TEST_CASE("error: one value per channel when training", "[errors]")
{
    fixture f;
    std::vector<float> x1(4), y1(4, 3.f);
    require_error(f.bn, {&y1}, [&] { f.bn.forward(vf::ncdhw_view(x1.data(), 1, 4, 1, 1, 1), vf::ncdhw_view(y1.data(), 1, 4, 1, 1, 1)); },
                  "Expected more than 1 value per channel when training, got input size [1, 4, 1, 1, 1]");
}

TEST_CASE("error: output shape differs from input shape", "[errors]")
{
    fixture f;
    std::vector<float> other(f.y.size());
    require_error(f.bn, {&other}, [&] { f.bn.forward(f.X(), vf::ncdhw_view(other.data(), 2, 4, 3, 2, 3)); },
                  "output has shape [2, 4, 3, 2, 3] but input has shape [2, 4, 2, 3, 3]");
}

TEST_CASE("error: null data pointers", "[errors]")
{
    fixture f;
    require_error(f.bn, {&f.y}, [&] { f.bn.forward(view_of<vf::ncdhw_t>(static_cast<float*>(nullptr), f.s), f.Y()); },
                  "input data pointer is null");
    require_error(f.bn, {&f.x}, [&] { f.bn.forward(f.X(), view_of<vf::ncdhw_t>(static_cast<float*>(nullptr), f.s)); },
                  "output data pointer is null");
    require_error(f.bn, {&f.dx}, [&] { f.bn.backward(f.X(), view_of<vf::ncdhw_t>(static_cast<float*>(nullptr), f.s), f.DX()); },
                  "grad_output data pointer is null");
    require_error(f.bn, {&f.dy}, [&] { f.bn.backward(f.X(), f.DY(), view_of<vf::ncdhw_t>(static_cast<float*>(nullptr), f.s)); },
                  "grad_input data pointer is null");
}

TEST_CASE("error: output partially overlapping the input", "[errors]")
{
    fixture f;
    std::vector<float> big(f.x.size() + 8);
    auto X = view_of<vf::ncdhw_t>(big.data(), f.s), Y = view_of<vf::ncdhw_t>(big.data() + 8, f.s);
    require_error(f.bn, {&big}, [&] { f.bn.forward(X, Y); },
                  "output partially overlaps input (it must be the same memory or disjoint)");
}

TEST_CASE("error: backward without a forward", "[errors]")
{
    fixture f;
    vf::BatchNorm3d<> fresh(4);
    require_error(fresh, {&f.dx}, [&] { fresh.backward(f.X(), f.DY(), f.DX()); },
                  "BatchNorm3d::backward called without a matching forward: run forward(X, Y) first");
}

TEST_CASE("error: backward on a shape the last forward did not see", "[errors]")
{
    fixture f;
    const sizes5 s2{2, 4, 3, 3, 2};
    require_error(f.bn, {&f.dx}, [&] {
        f.bn.backward(view_of<vf::ncdhw_t>(f.x.data(), s2), view_of<vf::ncdhw_t>(f.dy.data(), s2), view_of<vf::ncdhw_t>(f.dx.data(), s2));
    }, "BatchNorm3d::backward: input ncdhw [2, 4, 3, 3, 2] does not match the last forward's input ncdhw [2, 4, 2, 3, 3]");
    require_error(f.bn, {&f.dx}, [&] {
        f.bn.backward(view_of<vf::ndhwc_t>(f.x.data(), f.s), view_of<vf::ndhwc_t>(f.dy.data(), f.s), view_of<vf::ndhwc_t>(f.dx.data(), f.s));
    }, "BatchNorm3d::backward: input ndhwc [2, 4, 2, 3, 3] does not match the last forward's input ncdhw [2, 4, 2, 3, 3]");
}

TEST_CASE("error: backward on another tensor than the forward's input", "[errors]")
{
    fixture f;
    auto copy = f.x;
    require_error(f.bn, {&f.dx}, [&] { f.bn.backward(view_of<vf::ncdhw_t>(copy.data(), f.s), f.DY(), f.DX()); },
                  "BatchNorm3d::backward: X is not the input of the last forward");
}

TEST_CASE("error: backward after an in-place forward", "[errors]")
{
    fixture f;
    f.bn.forward(f.X(), f.X());
    require_error(f.bn, {&f.dx}, [&] { f.bn.backward(f.X(), f.DY(), f.DX()); },
                  "BatchNorm3d::backward: the last forward ran in place and overwrote its input; backward needs the "
                  "forward's input X (run forward out of place when training)");
}

TEST_CASE("error: gradient shapes and overlaps", "[errors]")
{
    fixture f;
    std::vector<float> small(f.dy.size());
    require_error(f.bn, {&f.dx}, [&] { f.bn.backward(f.X(), vf::ncdhw_view(small.data(), 2, 4, 3, 3, 2), f.DX()); },
                  "grad_output has shape [2, 4, 3, 3, 2] but input has shape [2, 4, 2, 3, 3]");
    require_error(f.bn, {&f.dy}, [&] { f.bn.backward(f.X(), f.DY(), vf::ncdhw_view(small.data(), 2, 4, 3, 3, 2)); },
                  "grad_input has shape [2, 4, 3, 3, 2] but input has shape [2, 4, 2, 3, 3]");
    std::vector<float> big(f.dy.size() + 4);
    require_error(f.bn, {&big}, [&] {
        f.bn.backward(f.X(), view_of<vf::ncdhw_t>(big.data(), f.s), view_of<vf::ncdhw_t>(big.data() + 4, f.s));
    }, "BatchNorm3d::backward: grad_input partially overlaps grad_output");
}

TEST_CASE("error: invalid construction", "[errors]")
{
    REQUIRE_THROWS_MATCHES(vf::BatchNorm3d<>(-1), vf::error,
                           Catch::Matchers::Message("Trying to create tensor with negative dimension -1: [-1]"));
    REQUIRE_THROWS_MATCHES(vf::BatchNorm3d<64>(32), vf::error,
                           Catch::Matchers::Message("BatchNorm3d<64> has 64 channels, not num_features=32"));
}

TEST_CASE("error: empty input to a module with zero features and affine", "[errors]")
{
    vf::BatchNorm3d<> bn(0);
    float dummy = 1.f;
    std::vector<float> none;
    require_error(bn, {&none}, [&] { bn.forward(vf::ncdhw_view(&dummy, 2, 0, 1, 1, 1), vf::ncdhw_view(&dummy, 2, 0, 1, 1, 1)); },
                  "select(): index 0 out of range for tensor of size [0] at dimension 0");
    REQUIRE(dummy == 1.f);
}

TEST_CASE("errors are volfuse::error, a std::exception", "[errors]")
{
    STATIC_REQUIRE(std::is_base_of_v<std::exception, vf::error>);
}
