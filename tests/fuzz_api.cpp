// A structure-aware fuzz driver of volfuse's public API (issue 11, class 2).
//
// One input (a byte string) decodes into modules built from fuzzed constructor arguments and a
// sequence of calls on views into one arena of floats: random layouts, shapes (0 and odd sizes
// included), channel counts that may not match, outputs that are fresh, the input itself,
// partially overlapping it, or null, data with NaN and Inf, backward calls paired with the
// last forward or not.  After every call it checks:
//   - an error is a vf::error, and then the arena and every module are byte-identical to before;
//   - a success wrote nothing outside its outputs, and (finite data) matches a float64
//     reference computed here, independently of volfuse's kernels;
//   - on a sample of calls, the same call on copies of the modules and the arena with 1 thread
//     gives the same bytes as with 2 threads.
// Any finding prints the input as hex and exits 1 (ASan/UBSan findings print it too).
//
// This is a seeded random driver, not libFuzzer: CI builds it with the project's own compiler
// (g++) in the existing ASan + UBSan build, and runs `fuzz_api --seconds S`: random inputs from
// a fixed seed for S seconds, after replaying every file of tests/fuzz_corpus (inputs that found
// bugs, kept as regression tests).  The entry point has libFuzzer's signature, so the same file
// links with clang's -fsanitize=fuzzer (build with -DVOLFUSE_LIBFUZZER) for coverage-guided runs.
#include <volfuse/volfuse.hpp>

#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <algorithm>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

namespace vf = volfuse;
using vf::index_t;
using sizes5 = std::array<index_t, 5>;

namespace {

const std::uint8_t* g_input = nullptr; // the input being run, printed by any finding
std::size_t g_size = 0;

std::size_t g_ok = 0, g_errors = 0, g_thread_checks = 0; // what the runs exercised
std::string g_save_dir; // --save DIR: a finding's input is written there (a corpus candidate)

void print_input()
{
    std::fprintf(stderr, "fuzz input (%zu bytes): ", g_size);
    std::uint64_t h = 1469598103934665603ull;
    for (std::size_t i = 0; i < g_size; ++i) {
        std::fprintf(stderr, "%02x", g_input[i]);
        h = (h ^ g_input[i]) * 1099511628211ull;
    }
    std::fprintf(stderr, "\n");
    if (!g_save_dir.empty()) {
        char name[64];
        std::snprintf(name, sizeof name, "/finding-%016llx.bin", static_cast<unsigned long long>(h));
        std::ofstream(g_save_dir + name, std::ios::binary).write(reinterpret_cast<const char*>(g_input),
                                                                  static_cast<std::streamsize>(g_size));
        std::fprintf(stderr, "saved as %s%s\n", g_save_dir.c_str(), name);
    }
}

[[noreturn]] void finding(const std::string& what)
{
    std::fprintf(stderr, "FINDING: %s\n", what.c_str());
    print_input();
    std::exit(1);
}

/// Reads decisions from the input; past its end every decision is 0 (the simplest choice).
struct decoder {
    const std::uint8_t* p;
    std::size_t n, i = 0;
    unsigned byte() { return i < n ? p[i++] : 0u; }
    int pick(int k) { return static_cast<int>(byte() % static_cast<unsigned>(k)); }
    bool one_in(int k) { return pick(k) == 0; }
};

index_t numel(const sizes5& s) { return s[0] * s[1] * s[2] * s[3] * s[4]; }

// --- the arena and the tensors of a call ----------------------------------------------------
constexpr index_t arena_floats = 1 << 15;
constexpr index_t null_offset = -1;

/// A tensor argument: an offset into the arena (or null) and sizes.
struct targ {
    index_t off;
    sizes5 s;
    float* ptr(std::vector<float>& a) const { return off == null_offset ? nullptr : a.data() + off; }
};

template <class L>
auto view(std::vector<float>& a, const targ& t)
{
    return vf::make_view<L>(t.ptr(a), t.s[0], t.s[1], t.s[2], t.s[3], t.s[4]);
}

/// Logical (n, c, d, h, w) value of a tensor stored in layout `ndhwc` or not.
float at(const std::vector<float>& a, const targ& t, bool ndhwc, index_t n, index_t c, index_t d, index_t h, index_t w)
{
    const auto& s = t.s;
    const index_t i = ndhwc ? (((n * s[2] + d) * s[3] + h) * s[4] + w) * s[1] + c
                            : (((n * s[1] + c) * s[2] + d) * s[3] + h) * s[4] + w;
    return a[static_cast<std::size_t>(t.off + i)];
}

// --- modules --------------------------------------------------------------------------------
struct modules {
    std::optional<vf::BatchNorm3d<>> bn;
    std::optional<vf::Conv3d<>> conv;
    std::optional<vf::ConvBnReLU3d<>> block;
    std::optional<vf::MaxPool3d> mp;
    std::optional<vf::AdaptiveAvgPool3d> ap;
    // The last successful forward's input per module (backward pairs with it most of the time).
    targ bn_x{0, {}}, block_x{0, {}};
    bool bn_ndhwc = false, block_ndhwc = false;
};

template <class BN>
void append_bn(std::vector<float>& s, const BN& bn)
{
    for (auto sp : {bn.weight(), bn.bias(), bn.running_mean(), bn.running_var(), bn.weight_grad(), bn.bias_grad()})
        s.insert(s.end(), sp.begin(), sp.end());
    s.push_back(static_cast<float>(bn.num_batches_tracked()));
    s.push_back(bn.training() ? 1.f : 0.f);
}
template <class C>
void append_conv(std::vector<float>& s, const C& c)
{
    for (auto sp : {c.weight(), c.bias(), c.weight_grad(), c.bias_grad()}) s.insert(s.end(), sp.begin(), sp.end());
}
/// Everything observable of the modules, as bytes.
std::vector<float> state_of(const modules& m)
{
    std::vector<float> s;
    if (m.bn) append_bn(s, *m.bn);
    if (m.conv) append_conv(s, *m.conv);
    if (m.block) {
        append_bn(s, m.block->bn());
        append_conv(s, m.block->conv());
    }
    return s;
}
bool same_bytes(const std::vector<float>& a, const std::vector<float>& b)
{
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

template <class F>
void construct(const char* what, F f)
{
    try {
        f();
    } catch (const vf::error&) {
    } catch (const std::exception& e) {
        finding(std::string(what) + " threw a non-volfuse exception: " + e.what());
    }
}

index_t small(decoder& d, int lo, int n) { return lo + d.pick(n); }

void build_modules(decoder& d, modules& m)
{
    const double eps[] = {1e-5, 1e-3, 0.1, 0.0};
    const std::optional<double> mom[] = {0.1, std::nullopt, 0.0, 1.0};
    construct("BatchNorm3d", [&] {
        m.bn.emplace(small(d, -1, 7), eps[d.pick(4)], mom[d.pick(4)], !d.one_in(4), !d.one_in(4));
    });
    auto conv_args = [&] {
        return std::tuple{small(d, 0, 5), small(d, 0, 5), vf::size3(small(d, 0, 4), small(d, 1, 3), small(d, 1, 3)),
                          vf::size3(small(d, 0, 3)), vf::size3(small(d, -1, 3)), vf::size3(small(d, 1, 2)),
                          !d.one_in(3)};
    };
    construct("Conv3d", [&] {
        auto [i, o, k, s, p, dil, b] = conv_args();
        m.conv.emplace(i, o, k, s, p, dil, 1, b);
    });
    construct("ConvBnReLU3d", [&] {
        auto [i, o, k, s, p, dil, b] = conv_args();
        const index_t c = d.one_in(6) ? small(d, 0, 5) : o;
        m.block.emplace(vf::Conv3d<>(i, o, k, s, p, dil, 1, b), vf::BatchNorm3d<>(c, eps[d.pick(3)], mom[d.pick(4)]));
    });
    construct("MaxPool3d", [&] {
        const vf::size3 k(small(d, 0, 4), small(d, 1, 3), small(d, 1, 3));
        std::optional<vf::size3> s;
        if (!d.one_in(2)) s = vf::size3(small(d, -1, 4));
        m.mp.emplace(k, s, vf::size3(small(d, -1, 3), 0, small(d, 0, 2)));
    });
    construct("AdaptiveAvgPool3d", [&] { m.ap.emplace(vf::size3(small(d, -1, 4), small(d, 0, 3), small(d, 1, 2))); });
}

// --- one call -------------------------------------------------------------------------------
// The decoding below is the corpus's format: changing what a byte means (more ops, another
// modulus) changes what every stored input exercises.  New calls get a new decoder version.
enum class op { bn_forward, bn_backward, conv_forward, conv_backward, block_forward, block_backward, max_pool, avg_pool,
                reorder, relu, mode, count };

struct call {
    op kind;
    bool ndhwc, relu_epi;
    targ x, y, dy; // y: output (or dX for backward)
};

sizes5 fuzz_sizes(decoder& d, index_t channels)
{
    const index_t c = channels >= 0 && !d.one_in(8) ? channels : small(d, 0, 6);
    // W sometimes wide enough for the conv kernels' interior tiles and vector bodies.
    return {small(d, 0, 3), c, small(d, 0, 6), small(d, 0, 6), d.one_in(4) ? small(d, 6, 19) : small(d, 0, 6)};
}

/// Where an output goes relative to x: fresh memory, x itself, partly over x, or null.
targ place_output(decoder& d, const targ& x, const sizes5& s, index_t fresh)
{
    switch (d.pick(10)) {
    case 0: return {x.off, s};
    case 1: return {x.off == null_offset ? 0 : x.off + 1 + d.pick(7), s};
    case 2: return {null_offset, s};
    default: return {fresh, s};
    }
}

/// Fills a tensor's memory with values decided by the input (NaN/Inf sometimes).
void fill(decoder& d, std::vector<float>& a, const targ& t)
{
    if (t.off == null_offset) return;
    const index_t n = std::min(numel(t.s), arena_floats - t.off);
    std::mt19937 g(d.byte());
    std::normal_distribution<float> nd(static_cast<float>(d.pick(5)) - 2.f, 1.f + static_cast<float>(d.pick(4)));
    const bool specials = d.one_in(5);
    for (index_t i = 0; i < n; ++i) {
        float v = nd(g);
        if (specials && g() % 17 == 0) {
            const float sp[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                                -std::numeric_limits<float>::infinity(), -0.f};
            v = sp[g() % 4];
        }
        a[static_cast<std::size_t>(t.off + i)] = v;
    }
}

bool fits(const targ& t) { return t.off == null_offset || t.off + numel(t.s) <= arena_floats; }

/// Runs call c on modules m over arena a.  Throws what volfuse throws.
void run(const call& c, modules& m, std::vector<float>& a)
{
    auto go = [&]<class L>() {
        auto X = view<L>(a, c.x);
        auto Y = view<L>(a, c.y);
        auto DY = view<L>(a, c.dy);
        switch (c.kind) {
        case op::bn_forward:
            if (c.relu_epi) m.bn->forward(X, Y, vf::relu);
            else m.bn->forward(X, Y);
            break;
        case op::bn_backward:
            if (c.relu_epi) m.bn->backward(X, DY, Y, vf::relu);
            else m.bn->backward(X, DY, Y);
            break;
        case op::conv_forward: m.conv->forward(X, Y); break;
        case op::conv_backward: m.conv->backward(X, DY, Y); break;
        case op::block_forward: m.block->forward(X, Y); break;
        case op::block_backward: m.block->backward(X, DY, Y); break;
        case op::max_pool: m.mp->forward(X, Y); break;
        case op::avg_pool: m.ap->forward(X, Y); break;
        case op::reorder:
            if constexpr (std::is_same_v<L, vf::ndhwc_t>) vf::reorder(X, view<vf::ncdhw_t>(a, c.y));
            else vf::reorder(X, view<vf::ndhwc_t>(a, c.y));
            break;
        case op::relu: vf::evaluate(Y, vf::relu(X)); break;
        default: break;
        }
    };
    if (c.ndhwc) go.template operator()<vf::ndhwc_t>();
    else go.template operator()<vf::ncdhw_t>();
}

bool finite(const std::vector<float>& a, const targ& t)
{
    for (index_t i = 0; i < numel(t.s); ++i)
        if (!std::isfinite(a[static_cast<std::size_t>(t.off + i)])) return false;
    return true;
}

/// got (arena, tensor t in the call's layout) against want (logical NCDHW, float64) within tol.
void compare(const char* what, const std::vector<float>& a, const targ& t, bool ndhwc, const std::vector<double>& want,
             const std::vector<double>& tol)
{
    const auto& s = t.s;
    index_t i = 0;
    for (index_t n = 0; n < s[0]; ++n)
        for (index_t c = 0; c < s[1]; ++c)
            for (index_t d = 0; d < s[2]; ++d)
                for (index_t h = 0; h < s[3]; ++h)
                    for (index_t w = 0; w < s[4]; ++w, ++i) {
                        const double got = at(a, t, ndhwc, n, c, d, h, w);
                        const double err = std::abs(got - want[i]);
                        if (!(err <= tol[i]) && !(std::isnan(got) && std::isnan(want[i])))
                            finding(std::string(what) + ": element " + std::to_string(i) + " is " + std::to_string(got) +
                                    ", the float64 reference says " + std::to_string(want[i]) + " (tolerance " +
                                    std::to_string(tol[i]) + ")");
                    }
}

constexpr double u = 0x1p-24;

/// Float64 references of the forward calls, from the arena and modules as they were before.
void check_reference(const call& c, const modules& before, const std::vector<float>& a0, const std::vector<float>& a)
{
    if (numel(c.x.s) == 0 || !finite(a0, c.x)) return; // (empty: nothing to compare, and C may not match)
    const auto& s = c.x.s;
    auto X = [&](index_t n, index_t ch, index_t d, index_t h, index_t w) {
        return static_cast<double>(at(a0, c.x, c.ndhwc, n, ch, d, h, w));
    };
    std::vector<double> want, tol;
    switch (c.kind) {
    case op::bn_forward: {
        const auto& bn = *before.bn;
        const bool batch = bn.training() || !bn.track_running_stats();
        const index_t C = s[1], per = numel(s) / std::max<index_t>(C, 1);
        std::vector<double> mean(C), var(C);
        for (index_t ch = 0; ch < C; ++ch) {
            if (batch) {
                double sum = 0, sq = 0;
                for (index_t n = 0; n < s[0]; ++n)
                    for (index_t d = 0; d < s[2]; ++d)
                        for (index_t h = 0; h < s[3]; ++h)
                            for (index_t w = 0; w < s[4]; ++w) sum += X(n, ch, d, h, w);
                mean[ch] = sum / static_cast<double>(per);
                for (index_t n = 0; n < s[0]; ++n)
                    for (index_t d = 0; d < s[2]; ++d)
                        for (index_t h = 0; h < s[3]; ++h)
                            for (index_t w = 0; w < s[4]; ++w) sq += (X(n, ch, d, h, w) - mean[ch]) * (X(n, ch, d, h, w) - mean[ch]);
                var[ch] = sq / static_cast<double>(per);
            } else {
                mean[ch] = bn.running_mean()[ch];
                var[ch] = bn.running_var()[ch];
            }
        }
        for (index_t n = 0; n < s[0]; ++n)
            for (index_t ch = 0; ch < C; ++ch) {
                const double g = bn.affine() ? bn.weight()[ch] : 1.0, b = bn.affine() ? bn.bias()[ch] : 0.0;
                const double is = (var[ch] == 0 && bn.eps() == 0) ? 0.0 : 1.0 / std::sqrt(var[ch] + bn.eps());
                for (index_t d = 0; d < s[2]; ++d)
                    for (index_t h = 0; h < s[3]; ++h)
                        for (index_t w = 0; w < s[4]; ++w) {
                            const double x = X(n, ch, d, h, w), pre = (x - mean[ch]) * is * g + b;
                            want.push_back(c.relu_epi && pre < 0 ? 0.0 : pre);
                            // a few roundings of each term; eps = 0 with a constant channel is exact 0
                            tol.push_back(64 * u * ((std::abs(x) + std::abs(mean[ch])) * is * std::abs(g) + std::abs(b)) +
                                          1e-30);
                        }
            }
        compare("BatchNorm3d::forward", a, c.y, c.ndhwc, want, tol);
        break;
    }
    case op::conv_forward: {
        const auto& cv = *before.conv;
        const auto os = c.y.s;
        const auto k = cv.kernel_size(), st = cv.stride(), p = cv.padding(), dl = cv.dilation();
        const auto w = cv.weight();
        for (index_t n = 0; n < os[0]; ++n)
            for (index_t oc = 0; oc < os[1]; ++oc)
                for (index_t od = 0; od < os[2]; ++od)
                    for (index_t oh = 0; oh < os[3]; ++oh)
                        for (index_t ow = 0; ow < os[4]; ++ow) {
                            double sum = cv.has_bias() ? cv.bias()[oc] : 0.0, mag = std::abs(sum);
                            for (index_t ic = 0; ic < s[1]; ++ic)
                                for (index_t kd = 0; kd < k.d; ++kd)
                                    for (index_t kh = 0; kh < k.h; ++kh)
                                        for (index_t kw = 0; kw < k.w; ++kw) {
                                            const index_t id = od * st.d - p.d + kd * dl.d, ih = oh * st.h - p.h + kh * dl.h,
                                                          iw = ow * st.w - p.w + kw * dl.w;
                                            if (id < 0 || ih < 0 || iw < 0 || id >= s[2] || ih >= s[3] || iw >= s[4]) continue;
                                            const double t = X(n, ic, id, ih, iw) *
                                                             w[static_cast<std::size_t>((((oc * s[1] + ic) * k.d + kd) * k.h + kh) * k.w + kw)];
                                            sum += t;
                                            mag += std::abs(t);
                                        }
                            want.push_back(sum);
                            tol.push_back((s[1] * k.d * k.h * k.w + 3) * u * mag + 1e-30);
                        }
        compare("Conv3d::forward", a, c.y, c.ndhwc, want, tol);
        break;
    }
    case op::max_pool:
    case op::avg_pool: {
        const auto os = c.y.s;
        for (index_t n = 0; n < os[0]; ++n)
            for (index_t ch = 0; ch < os[1]; ++ch)
                for (index_t od = 0; od < os[2]; ++od)
                    for (index_t oh = 0; oh < os[3]; ++oh)
                        for (index_t ow = 0; ow < os[4]; ++ow) {
                            const std::array<index_t, 3> o{od, oh, ow};
                            std::array<index_t, 3> lo{}, hi{};
                            for (int i = 0; i < 3; ++i) {
                                if (c.kind == op::max_pool) {
                                    const auto k = before.mp->kernel_size(), st = before.mp->stride(), p = before.mp->padding();
                                    lo[i] = std::max<index_t>(0, o[i] * st[i] - p[i]);
                                    hi[i] = std::min<index_t>(s[2 + i], o[i] * st[i] - p[i] + k[i]);
                                } else {
                                    const index_t O = os[2 + i], I = s[2 + i];
                                    lo[i] = o[i] * I / O;
                                    hi[i] = ((o[i] + 1) * I + O - 1) / O;
                                }
                            }
                            double m = -std::numeric_limits<double>::infinity(), sum = 0, mag = 0;
                            index_t cnt = 0;
                            for (index_t d = lo[0]; d < hi[0]; ++d)
                                for (index_t h = lo[1]; h < hi[1]; ++h)
                                    for (index_t w = lo[2]; w < hi[2]; ++w) {
                                        m = std::max(m, X(n, ch, d, h, w));
                                        sum += X(n, ch, d, h, w);
                                        mag += std::abs(X(n, ch, d, h, w));
                                        ++cnt;
                                    }
                            want.push_back(c.kind == op::max_pool ? m : sum / static_cast<double>(cnt));
                            tol.push_back(c.kind == op::max_pool ? 0.0 : (cnt + 3) * u * mag / static_cast<double>(cnt) + 1e-30);
                        }
        compare(c.kind == op::max_pool ? "MaxPool3d::forward" : "AdaptiveAvgPool3d::forward", a, c.y, c.ndhwc, want, tol);
        break;
    }
    case op::reorder:
    case op::relu: {
        for (index_t n = 0; n < s[0]; ++n)
            for (index_t ch = 0; ch < s[1]; ++ch)
                for (index_t d = 0; d < s[2]; ++d)
                    for (index_t h = 0; h < s[3]; ++h)
                        for (index_t w = 0; w < s[4]; ++w) {
                            const double x = X(n, ch, d, h, w);
                            want.push_back(c.kind == op::relu && x < 0 ? 0.0 : x);
                            tol.push_back(0.0);
                        }
        // reorder writes the other layout
        compare("reorder / relu", a, c.y, c.kind == op::reorder ? !c.ndhwc : c.ndhwc, want, tol);
        break;
    }
    default: break;
    }
}

/// The regions a successful call may write: its output (and dX).
bool writable(const call& c, index_t i)
{
    const targ& t = c.y;
    return t.off != null_offset && i >= t.off && i < t.off + numel(t.s);
}

call decode_call(decoder& d, modules& m, index_t& fresh)
{
    call c{static_cast<op>(d.pick(static_cast<int>(op::count))), d.one_in(2), d.one_in(2), {0, {}}, {0, {}}, {0, {}}};
    index_t channels = -1;
    switch (c.kind) {
    case op::bn_forward:
    case op::bn_backward: channels = m.bn ? m.bn->num_features() : -1; break;
    case op::conv_forward:
    case op::conv_backward: channels = m.conv ? m.conv->in_channels() : -1; break;
    case op::block_forward:
    case op::block_backward: channels = m.block ? m.block->conv().in_channels() : -1; break;
    default: break;
    }
    const sizes5 xs = fuzz_sizes(d, channels);
    c.x = {d.one_in(16) ? null_offset : static_cast<index_t>(d.pick(4)) * 64, xs};
    // Backward most often pairs with the module's last forward input (its X and layout).
    if (c.kind == op::bn_backward && !d.one_in(4)) c.x = m.bn_x, c.ndhwc = m.bn_ndhwc;
    if (c.kind == op::block_backward && !d.one_in(4)) c.x = m.block_x, c.ndhwc = m.block_ndhwc;
    // The output's sizes: what the op expects for x (computed by the module where it has a rule) or fuzzed.
    sizes5 ys = c.x.s;
    try {
        if ((c.kind == op::conv_forward) && m.conv) ys = m.conv->output_sizes(c.x.s);
        if ((c.kind == op::block_forward || c.kind == op::block_backward) && m.block) ys = m.block->output_sizes(c.x.s);
        if (c.kind == op::conv_backward && m.conv) ys = m.conv->output_sizes(c.x.s);
        if (c.kind == op::max_pool && m.mp) ys = m.mp->output_sizes(c.x.s);
        if (c.kind == op::avg_pool && m.ap) ys = m.ap->output_sizes(c.x.s);
    } catch (const vf::error&) {
    }
    for (auto& v : ys) v = std::max<index_t>(v, 0);
    if (d.one_in(10)) ys = fuzz_sizes(d, -1);
    fresh = 1 << 13;
    const bool backward = c.kind == op::bn_backward || c.kind == op::conv_backward || c.kind == op::block_backward;
    if (backward) {
        // dY has the output's sizes, dX (stored in c.y) the input's.
        c.dy = place_output(d, c.x, ys, fresh);
        c.y = place_output(d, c.x, c.x.s, fresh + (1 << 13));
        if (d.one_in(8)) c.y = {c.dy.off, c.x.s}; // dX over dY
    } else {
        c.y = place_output(d, c.x, ys, fresh);
    }
    return c;
}

int fuzz_one(const std::uint8_t* data, std::size_t size, bool check_threads)
{
    g_input = data;
    g_size = size;
    decoder d{data, size};
    modules m;
    build_modules(d, m);
    std::vector<float> a(static_cast<std::size_t>(arena_floats), 0.f);
    for (int step = 0; step < 6 && d.i < d.n; ++step) {
        index_t fresh = 0;
        const call c = decode_call(d, m, fresh);
        if (!fits(c.x) || !fits(c.y) || !fits(c.dy)) continue; // the arena is the memory the views claim
        const bool have = [&] {
            switch (c.kind) {
            case op::bn_forward:
            case op::bn_backward: return m.bn.has_value();
            case op::conv_forward:
            case op::conv_backward: return m.conv.has_value();
            case op::block_forward:
            case op::block_backward: return m.block.has_value();
            case op::max_pool: return m.mp.has_value();
            case op::avg_pool: return m.ap.has_value();
            default: return true;
            }
        }();
        if (!have) continue; // its constructor refused the fuzzed arguments
        fill(d, a, c.x);
        if (c.kind == op::bn_backward || c.kind == op::conv_backward || c.kind == op::block_backward) fill(d, a, c.dy);
        if (c.kind == op::mode) {
            const bool train = d.one_in(2);
            if (m.bn) m.bn->train(train);
            if (m.block) m.block->train(train);
            continue;
        }
        const bool threads = check_threads && d.one_in(3);
        const modules before = m;
        const std::vector<float> a0 = a, s0 = state_of(m);
        vf::set_num_threads(2);
        bool ok = true;
        try {
            run(c, m, a);
        } catch (const vf::error&) {
            ok = false;
        } catch (const std::exception& e) {
            finding(std::string("a call threw a non-volfuse exception: ") + e.what());
        }
        ++(ok ? g_ok : g_errors);
        if (!ok) {
            if (!same_bytes(a, a0)) finding("a call that threw changed memory");
            if (!same_bytes(state_of(m), s0)) finding("a call that threw changed module state");
            continue;
        }
        for (index_t i = 0; i < arena_floats; ++i)
            if (!writable(c, i) && std::memcmp(&a[static_cast<std::size_t>(i)], &a0[static_cast<std::size_t>(i)], 4) != 0)
                finding("a call wrote outside its outputs (arena element " + std::to_string(i) + ")");
        check_reference(c, before, a0, a);
        if (c.kind == op::bn_forward) m.bn_x = c.x, m.bn_ndhwc = c.ndhwc;
        if (c.kind == op::block_forward) m.block_x = c.x, m.block_ndhwc = c.ndhwc;
        if (threads) {
            // The same call from the same state with 1 thread, on the same memory (modules keep
            // pointers to their last input): the bytes must be the same.
            ++g_thread_checks;
            modules one = before;
            const std::vector<float> a2 = a;
            a = a0;
            vf::set_num_threads(1);
            try {
                run(c, one, a);
            } catch (const vf::error& e) {
                finding(std::string("1 thread threw where 2 threads succeeded: ") + e.what());
            }
            vf::set_num_threads(2);
            if (!same_bytes(a, a2) || !same_bytes(state_of(one), state_of(m)))
                finding("1 and 2 threads gave different bytes");
        }
    }
    return 0;
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    return fuzz_one(data, size, true);
}

#ifndef VOLFUSE_LIBFUZZER
/// fuzz_api [--seconds S] [--seed N] [--save DIR] [corpus files or directories...]
int main(int argc, char** argv)
{
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_set_death_callback(print_input);
#endif
    // Without a sanitizer, a crash still names its input (best effort from a signal handler).
    for (int sig : {SIGSEGV, SIGFPE, SIGBUS, SIGABRT, SIGILL})
        std::signal(sig, [](int s) {
            std::fprintf(stderr, "FINDING: signal %d\n", s);
            print_input();
            std::_Exit(128 + s);
        });
    double seconds = 10;
    std::uint64_t seed = 1;
    std::vector<std::filesystem::path> corpus;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--seconds" && i + 1 < argc) seconds = std::stod(argv[++i]);
        else if (a == "--seed" && i + 1 < argc) seed = std::stoull(argv[++i]);
        else if (a == "--save" && i + 1 < argc) g_save_dir = argv[++i];
        else corpus.emplace_back(a);
    }
    std::size_t replayed = 0;
    for (const auto& p : corpus) {
        std::vector<std::filesystem::path> files;
        if (std::filesystem::is_directory(p)) {
            for (const auto& e : std::filesystem::directory_iterator(p))
                if (e.is_regular_file()) files.push_back(e.path());
        } else {
            files.push_back(p);
        }
        std::sort(files.begin(), files.end());
        for (const auto& f : files) {
            std::ifstream in(f, std::ios::binary);
            std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
            fuzz_one(bytes.data(), bytes.size(), true);
            ++replayed;
        }
    }
    std::mt19937_64 g(seed);
    const auto t0 = std::chrono::steady_clock::now();
    std::size_t runs = 0;
    std::vector<std::uint8_t> bytes;
    while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < seconds) {
        bytes.resize(16 + g() % 240);
        for (auto& b : bytes) b = static_cast<std::uint8_t>(g());
        fuzz_one(bytes.data(), bytes.size(), true);
        ++runs;
    }
    std::printf("fuzz_api: %zu corpus inputs replayed, %zu random inputs (seed %llu, %.0f s): %zu calls succeeded "
                "(checked against float64 references), %zu refused with vf::error (state and memory unchanged), "
                "%zu compared across 1 and 2 threads; no findings\n",
                replayed, runs, static_cast<unsigned long long>(seed), seconds, g_ok, g_errors, g_thread_checks);
    return 0;
}
#endif
