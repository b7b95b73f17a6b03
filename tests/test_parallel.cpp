// Threads: results are bitwise identical for any thread count (a fixed reduction
// tree), unlike PyTorch's channels-last path (pytorch#121651).
#include "support.hpp"

namespace {

struct restore_threads {
    int saved = vf::get_num_threads();
    ~restore_threads() { vf::set_num_threads(saved); }
};

template <class L, index_t SC>
void same_for_any_thread_count(const sizes5& s)
{
    std::mt19937 g(21);
    const auto x = randn(numel(s), g, 3.0, 2.0), dy = randn(numel(s), g);
    std::vector<std::vector<std::vector<float>>> results;
    for (const int threads : {1, 2, 3}) {
        vf::set_num_threads(threads);
        REQUIRE(vf::get_num_threads() == threads);
        vf::BatchNorm3d<SC> bn(s[1]);
        results.push_back(trace<L>(bn, x, dy, s, true, {true, false}));
    }
    for (std::size_t t = 1; t < results.size(); ++t)
        for (std::size_t k = 0; k < results[0].size(); ++k) {
            INFO("layout " << L::name << " C " << s[1] << (SC == vf::dynamic ? " dynamic" : " static") << " threads "
                           << t + 1 << " output " << k);
            REQUIRE(same_bits(results[t][k], results[0][k]));
        }
}

} // namespace

TEST_CASE("results are bitwise identical for 1, 2 and 3 threads", "[parallel]")
{
    restore_threads guard;
#ifndef _OPENMP
    WARN("built without OpenMP: kernels run on one thread");
#endif
    // Big enough to run in parallel; NDHWC spans several fixed pixel blocks (2048 pixels each).
    const sizes5 a{2, 17, 8, 16, 20}, b{3, 32, 5, 9, 31};
    same_for_any_thread_count<vf::ncdhw_t, vf::dynamic>(a);
    same_for_any_thread_count<vf::ndhwc_t, vf::dynamic>(a);
    same_for_any_thread_count<vf::ncdhw_t, 32>(b);
    same_for_any_thread_count<vf::ndhwc_t, 32>(b);
    same_for_any_thread_count<vf::nCdhw16c_t, vf::dynamic>(a);
    same_for_any_thread_count<vf::nCdhw16c_t, 32>(b);
}

TEST_CASE("set_num_threads rejects a count below 1", "[parallel][errors]")
{
    restore_threads guard;
    const int before = vf::get_num_threads();
    REQUIRE_THROWS_MATCHES(vf::set_num_threads(0), vf::error,
                           Catch::Matchers::Message("set_num_threads: expected a positive number of threads, got 0"));
    REQUIRE(vf::get_num_threads() == before);
}
