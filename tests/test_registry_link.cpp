// Generated kernels as a downstream build links them: from static libraries, registered by the
// generated register_kernels() (a static library's objects are only linked when referenced, so
// static initialization alone would register nothing), one of them compiled for another ISA than
// this code, whose entries the registry must refuse, saying why, and not run.
#include "support.hpp"

#include "registry_isa.hpp"  // tests/registry_isa.arch, a static library built for another -march
#include "registry_test.hpp" // tests/registry_test.arch, a static library built with these flags

using Catch::Matchers::Contains;

TEST_CASE("generated kernels in a static library register through register_kernels()", "[registry]")
{
    registry_test::register_kernels();
    registry_test::register_kernels(); // harmless again
    vf::Conv3d<> conv(8, 24, {1, 3, 3}, {1, 2, 1}, {0, 1, 1});
    const auto c = conv.kernel_choice(vf::ncdhw);
    REQUIRE(c.specialized);
    REQUIRE_THAT(c.why, Contains("registry_test.arch"));
    // Before any call, kernel_choice() says there was none; after one, what ran.
    REQUIRE_THAT(conv.kernel_choice().why, Contains("no call yet"));
    std::mt19937 g(3);
    const sizes5 xs{1, 8, 2, 5, 6};
    const auto x = randn(numel(xs), g);
    std::vector<float> y(static_cast<std::size_t>(numel(conv.output_sizes(xs))));
    auto xv = x;
    conv.forward(view_of<vf::ncdhw_t>(xv.data(), xs), view_of<vf::ncdhw_t>(y.data(), conv.output_sizes(xs)));
    REQUIRE(conv.kernel_choice().specialized);
}

TEST_CASE("kernels generated for another ISA are refused, with the reason, and the fallback runs", "[registry]")
{
    registry_isa::register_kernels();
    vf::Conv3d<> conv(3, 24, 3, 1, 1); // tests/registry_isa.arch's layer (out_channels = 24)
    const auto c = conv.kernel_choice(vf::ncdhw);
    REQUIRE_FALSE(c.specialized);
    REQUIRE_THAT(c.why, Contains("were compiled for") && Contains("registry_isa.arch") &&
                            Contains("this code for " VOLFUSE_ABI_STAMP) && Contains("refused"));
    // The result is the runtime-shaped fallback's, bit for bit (the registry switched off gives it).
    std::mt19937 g(5);
    const sizes5 xs{2, 3, 4, 5, 7};
    const sizes5 ys = conv.output_sizes(xs);
    auto x = randn(numel(xs), g);
    std::vector<float> y1(static_cast<std::size_t>(numel(ys))), y2(y1.size());
    conv.forward(view_of<vf::ncdhw_t>(x.data(), xs), view_of<vf::ncdhw_t>(y1.data(), ys));
    REQUIRE_THAT(conv.kernel_choice().why, Contains("refused"));
    vf::registry::global().set_enabled(false);
    vf::Conv3d<> plain = conv;
    plain.forward(view_of<vf::ncdhw_t>(x.data(), xs), view_of<vf::ncdhw_t>(y2.data(), ys));
    vf::registry::global().set_enabled(true);
    REQUIRE_THAT(plain.kernel_choice().why, Contains("registry disabled"));
    REQUIRE(same_bits(y1, y2));
}

TEST_CASE("vf::this_build says what the build loses on this machine", "[build]")
{
    const vf::build_info b = vf::this_build();
    REQUIRE(std::string(b.isa) == VOLFUSE_STR(VOLFUSE_ISA));
    REQUIRE(b.vector_width == vf::simd::width);
    REQUIRE(b.openmp); // the tests are built with dependency('volfuse'), which carries OpenMP
    REQUIRE(b.machine_width >= 4);
    REQUIRE(b.isa_problem().empty() == (b.vector_width >= b.machine_width));
    const vf::build_info slow{"sse2", 4, 16, false};
    REQUIRE_THAT(slow.problems(), Contains("compiled for sse2 (4 floats per vector) but this CPU runs 16") &&
                                      Contains("-march=native") && Contains("built without OpenMP"));
    REQUIRE(vf::build_info{"avx512bw", 16, 16, true}.problems().empty());
}
