// Golden tests: sequences of training and eval steps recorded from PyTorch 1.13
// (tests/golden/make_golden.py).  The fixture file is VOLFUSE_FIXTURES if set (the
// live-PyTorch test points it at freshly generated random cases), else the committed one.
#include <bit>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>

#include "support.hpp"

namespace {

struct step {
    bool train;
    sizes5 s;
    std::map<std::string, std::vector<float>> t;
    std::int64_t nbt = 0;
};
struct golden_case {
    std::string name, layout;
    index_t C;
    double eps;
    std::optional<double> momentum;
    bool affine, track, relu;
    std::vector<float> weight, bias;
    std::vector<step> steps;
};

std::vector<float> read_values(std::istringstream& in)
{
    std::size_t n;
    in >> n;
    std::vector<float> v(n);
    for (auto& x : v) {
        std::string h;
        in >> h;
        x = std::bit_cast<float>(static_cast<std::uint32_t>(std::stoul(h, nullptr, 16)));
    }
    return v;
}

std::vector<golden_case> load(const std::string& path)
{
    std::ifstream f(path);
    if (!f) throw std::runtime_error("cannot open fixture file " + path);
    std::vector<golden_case> cases;
    std::string line;
    while (std::getline(f, line)) {
        std::istringstream in(line);
        std::string key;
        in >> key;
        if (key.empty() || key[0] == '#') continue;
        if (key == "case") {
            golden_case c;
            std::string mom;
            int affine, track, relu;
            in >> c.name >> c.C >> c.eps >> mom >> affine >> track >> c.layout >> relu;
            if (mom != "None") c.momentum = std::stod(mom);
            c.affine = affine, c.track = track, c.relu = relu;
            cases.push_back(std::move(c));
        } else if (key == "weight") {
            cases.back().weight = read_values(in);
        } else if (key == "bias") {
            cases.back().bias = read_values(in);
        } else if (key == "step") {
            step s;
            std::string mode;
            in >> mode;
            s.train = mode == "train";
            for (auto& e : s.s) in >> e;
            cases.back().steps.push_back(std::move(s));
        } else if (key == "nbt") {
            in >> cases.back().steps.back().nbt;
        } else {
            cases.back().steps.back().t[key] = read_values(in);
        }
    }
    return cases;
}

double max_abs(const std::vector<float>& v)
{
    double m = 0;
    for (float x : v) m = std::max(m, static_cast<double>(std::abs(x)));
    return m;
}

/// Per channel of x (sizes s), in double: mean, M2 = sum (x - mean)^2, mean |x| and the first
/// value (at n = d = h = w = 0, first in memory in every layout): what the float-sum error
/// bounds below are relative to.
struct channel_moments {
    std::vector<double> mean, m2, mean_abs, first;
};
channel_moments moments_of(const sizes5& s, const std::vector<float>& x)
{
    const index_t C = s[1];
    const double n = static_cast<double>(numel(s) / C);
    channel_moments m{std::vector<double>(C), std::vector<double>(C), std::vector<double>(C), std::vector<double>(C)};
    for_each_index(s, [&](index_t b, index_t c, index_t d, index_t h, index_t w, index_t i) {
        m.mean[c] += x[i] / n;
        m.mean_abs[c] += std::abs(x[i]) / n;
        if (b == 0 && d == 0 && h == 0 && w == 0) m.first[c] = x[i];
    });
    for_each_index(s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
        m.m2[c] += (x[i] - m.mean[c]) * (x[i] - m.mean[c]);
    });
    return m;
}

template <class L>
void run(const golden_case& gc, vf::batch_stats_policy policy)
{
    vf::BatchNorm3d<> bn(gc.C, gc.eps, gc.momentum, gc.affine, gc.track);
    bn.set_stats_policy(policy);
    const bool aten = policy == vf::batch_stats_policy::aten;
    std::copy(gc.weight.begin(), gc.weight.end(), bn.weight().begin());
    std::copy(gc.bias.begin(), gc.bias.end(), bn.bias().begin());
    int k = 0;
    std::vector<double> torch_dmu;              // ATen's mean error times invstd, per channel, of the last step
    std::vector<double> torch_rm_err(gc.C, 0.0); // bound on ATen's float-sum error carried in running_mean
    std::vector<double> torch_rv_err(gc.C, 0.0); // ... and in running_var
    std::vector<double> fast_rv_err(gc.C, 0.0);  // bound on policy fast's float-run error in running_var
    std::vector<float> prev_gw(gc.C, 0.f), prev_gb(gc.C, 0.f); // grads accumulate: this step's = now - before
    // What ReLU decisions other than PyTorch's (below) add to volfuse's accumulated grads, exactly.
    std::vector<double> decided_gw(gc.C, 0.0), decided_gb(gc.C, 0.0);
    for (const step& st : gc.steps) {
        INFO("case " << gc.name << " step " << k++ << (st.train ? " train" : " eval") << " policy "
                      << (aten ? "aten" : "fast"));
        bn.train(st.train);
        const auto& x = st.t.at("x");
        const bool torch_contiguous = gc.layout == "ncdhw" && st.s[2] * st.s[3] * st.s[4] > 1;
        const auto rm = vec(bn.running_mean()), rv = vec(bn.running_var());
        bn_run<L> r(x, st.s);
        const channel_moments mo = x.empty() ? channel_moments{} : moments_of(st.s, x);
        const auto y = r.forward(bn, gc.relu);
        const auto dx = r.backward(bn, st.t.at("dy"), gc.relu);
        if (x.empty()) {
            REQUIRE(st.t.at("y").empty());
        } else {
            reference ref;
            const bool batch_stats = st.train || !gc.track;
            ref.forward(x, st.s, gc.weight, gc.bias, batch_stats, rm, rv, gc.eps, gc.relu);
            // ATen's own error, which ours does not share: it normalizes with a float mean that is off
            // from the true one by dmu (half an ulp on its contiguous path; a float cascade sum's error,
            // about log2(n) ulps of mean(|x|), on its channels-last and NC111 paths: SEMANTICS §4.2),
            // and its contiguous output x * alpha + (beta - mean * alpha) rounds |mean * alpha|.
            const double n = static_cast<double>(numel(st.s) / gc.C);
            std::vector<double> dmu(gc.C, 0.0);
            for (index_t c = 0; c < gc.C; ++c)
                dmu[c] = !batch_stats ? torch_rm_err[c] // eval: the running means differ by this much
                         : torch_contiguous ? 0.5 * eps_f * std::abs(ref.mean[c])
                                            : (std::log2(n) + 1) * eps_f * mo.mean_abs[c];
            const auto& ty = st.t.at("y");
            for_each_index(st.s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
                const double g = gc.affine ? std::abs(gc.weight[c]) : 1.0;
                const double torch_y = (dmu[c] + 4 * eps_f * std::abs(ref.mean[c])) * ref.invstd[c] * g;
                INFO("channel " << c << " x " << x[i] << " mean " << ref.mean[c] << " invstd " << ref.invstd[c]);
                CHECK_NEAR(y[i], ty[i], ref.bound(x, gc.weight, gc.bias, c, i) + torch_y);
            });
            // Gradients: dmu moves ATen's dx by gamma*invstd^2*(|gw| + |x - mean|*invstd*|gb|)/n*dmu
            // and its grad_weight by invstd*|gb|*dmu.
            const auto& tdx = st.t.at("dx");
            const auto& dy = st.t.at("dy");
            std::vector<bool> mask, ours;
            if (gc.relu)
                for (std::size_t i = 0; i < ty.size(); ++i) mask.push_back(ty[i] > 0.f), ours.push_back(y[i] > 0.f);
            // ReLU's decision at an element whose input rounds to either side of zero (|y| within
            // the bound checked above) can differ from PyTorch's; it changes its channel's
            // mean(dy) terms, so every dx of that channel.  Such channels are held to the float64
            // reference taking volfuse's own decisions (each side is the exact gradient of its own
            // forward), the others to PyTorch's dx.
            std::vector<bool> switched(gc.C, false);
            for_each_index(st.s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
                if (gc.relu && mask[i] != ours[i]) switched[c] = true;
            });
            const auto gr = ref.backward(x, dy, gc.weight, batch_stats, mask);
            const auto gr_ours = ref.backward(x, dy, gc.weight, batch_stats, ours);
            for (index_t c = 0; c < gc.C; ++c)
                if (switched[c]) decided_gw[c] += gr_ours.gw[c] - gr.gw[c], decided_gb[c] += gr_ours.gb[c] - gr.gb[c];
            for_each_index(st.s, [&](index_t, index_t c, index_t, index_t, index_t, index_t i) {
                const double g = gc.affine ? std::abs(gc.weight[c]) : 1.0, is = ref.invstd[c];
                const double gw = gc.affine ? std::abs(st.t.at("grad_weight")[c] - prev_gw[c]) : 0.0;
                const double gb = gc.affine ? std::abs(st.t.at("grad_bias")[c] - prev_gb[c]) : 0.0;
                const double torch_dx = g * is * is * (gw + std::abs(x[i] - ref.mean[c]) * is * gb) / n * dmu[c];
                if (switched[c]) {
                    INFO("channel " << c << ": ReLU decided otherwise than PyTorch at an element near zero");
                    CHECK_NEAR(dx[i], gr_ours.dx[i], 2 * ref.dx_bound(gr_ours, x, dy, gc.weight, c, i));
                } else {
                    CHECK_NEAR(dx[i], tdx[i], 2 * ref.dx_bound(gr, x, dy, gc.weight, c, i) + torch_dx);
                }
            });
            torch_dmu.assign(gc.C, 0.0);
            for (index_t c = 0; c < gc.C; ++c) torch_dmu[c] = dmu[c] * ref.invstd[c];
        }
        if (gc.track && st.train && !x.empty() && !torch_contiguous) {
            // A float sum's error is relative to sum(|x|), not to the (possibly tiny) mean.
            const double n = static_cast<double>(numel(st.s) / gc.C);
            const double m = gc.momentum ? *gc.momentum : 1.0 / static_cast<double>(st.nbt);
            // Its variance is a float sum of (x - mean)^2 as well: the same relative error, of
            // the (nonnegative) sum itself, enters the unbiased estimate the running_var takes.
            for (index_t c = 0; c < gc.C; ++c) {
                torch_rm_err[c] += m * (std::log2(n) + 1) * eps_f * mo.mean_abs[c];
                if (n > 1) torch_rv_err[c] += m * (std::log2(n) + 1) * eps_f * mo.m2[c] / (n - 1);
            }
        }
        if (gc.track && st.train && !x.empty() && !aten) {
            // Policy fast sums S2 = sum (x - s)^2 about the channel's first value s in float runs
            // of up to stats_run terms: an error relative to S2 = M2 + n (mean - s)^2, carried
            // into M2 (docs/batchnorm.md), so relative to M2 it grows with ((s - mean) / std)^2.
            const double n = static_cast<double>(numel(st.s) / gc.C);
            const double m = gc.momentum ? *gc.momentum : 1.0 / static_cast<double>(st.nbt);
            const double runs = std::log2(std::min<double>(n, vf::kernels::stats_run)) + 1;
            for (index_t c = 0; c < gc.C; ++c)
                if (n > 1)
                    fast_rv_err[c] += m * runs * eps_f *
                                      (mo.m2[c] + n * (mo.mean[c] - mo.first[c]) * (mo.mean[c] - mo.first[c])) / (n - 1);
        }
        if (gc.track) {
            REQUIRE(bn.num_batches_tracked() == st.nbt);
            const auto& trm = st.t.at("running_mean");
            const auto& trv = st.t.at("running_var");
            for (index_t c = 0; c < gc.C; ++c) {
                if (aten && std::is_same_v<L, vf::ncdhw_t> && st.s[2] * st.s[3] * st.s[4] > 1) {
                    // Contiguous NCDHW, policy aten: ATen's statistics and update rounding, bit for bit.
                    // (D=H=W=1 takes ATen's channels-last kernel, float sums: SEMANTICS §4.2.)
                    INFO("channel " << c << " running_mean " << bn.running_mean()[c] << " vs " << trm[c]
                                    << ", running_var " << bn.running_var()[c] << " vs " << trv[c]);
                    CHECK(same_bits(bn.running_mean()[c], trm[c]));
                    CHECK(same_bits(bn.running_var()[c], trv[c]));
                } else {
                    // channels_last_3d and NC111: PyTorch 1.13 sums in float there (SEMANTICS §4.2);
                    // policy fast: our own sums (a float rounding of the variance, SEMANTICS-level).
                    CHECK_NEAR(bn.running_mean()[c], trm[c], 4 * eps_f * std::abs(trm[c]) + torch_rm_err[c]);
                    CHECK_NEAR(bn.running_var()[c], trv[c],
                               4 * eps_f * std::abs(trv[c]) + torch_rv_err[c] + fast_rv_err[c]);
                }
            }
        }
        if (gc.affine) {
            const index_t n = std::max<index_t>(numel(st.s) / std::max<index_t>(gc.C, 1), 1);
            for (const char* key : {"grad_weight", "grad_bias"}) {
                const auto& tg = st.t.at(key);
                const bool is_weight = std::string(key) == "grad_weight";
                const auto ours = vec(is_weight ? bn.weight_grad() : bn.bias_grad());
                for (index_t c = 0; c < gc.C; ++c) {
                    const double torch_gw = is_weight && !torch_dmu.empty() ? torch_dmu[c] * k * (std::abs(st.t.at("grad_bias")[c]) + 1) : 0.0;
                    if (!is_weight) prev_gb[c] = tg[c];
                    else prev_gw[c] = tg[c];
                    const double decided = is_weight ? decided_gw[c] : decided_gb[c];
                    CHECK_NEAR(ours[c], tg[c] + decided,
                               4e-6 * std::sqrt(static_cast<double>(n) * k) * (max_abs(tg) + 1) + torch_gw);
                }
            }
        }
    }
}

std::string fixture_path()
{
    const char* env = std::getenv("VOLFUSE_FIXTURES");
    return env && *env ? env : VOLFUSE_GOLDEN_FILE;
}

} // namespace

TEST_CASE("BatchNorm3d matches PyTorch 1.13 on recorded sequences", "[golden]")
{
    const auto cases = load(fixture_path());
    REQUIRE(!cases.empty());
    for (const auto policy : {vf::batch_stats_policy::aten, vf::batch_stats_policy::fast})
        for (const auto& gc : cases) {
            if (gc.layout == "ncdhw") run<vf::ncdhw_t>(gc, policy);
            else run<vf::ndhwc_t>(gc, policy);
        }
}
