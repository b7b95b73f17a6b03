// Conv3d geometry: PyTorch's (d, h, w) triples, the compile-time spec a Conv3d can
// be specialized on, and the geometry object kernels read, whose members are
// compile-time constants where the spec fixes them and run-time values elsewhere
// (one kernel template for both, as with shape5's extents).
#pragma once

#include <array>
#include <string>

#include "../core/config.hpp"
#include "../core/error.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

/// kernel_size / stride / padding / dilation as PyTorch takes them: one integer for
/// all three dimensions, or {d, h, w}.
struct size3 {
    index_t d = 0, h = 0, w = 0;
    constexpr size3(index_t v) noexcept : d(v), h(v), w(v) {}
    constexpr size3(index_t d_, index_t h_, index_t w_) noexcept : d(d_), h(h_), w(w_) {}
    constexpr index_t operator[](int i) const noexcept { return i == 0 ? d : i == 1 ? h : w; }
    constexpr bool operator==(const size3&) const noexcept = default;
    /// "(3, 3, 3)", as PyTorch's repr prints a triple.
    std::string str() const
    {
        // Appended piece by piece: GCC 12 warns falsely (-Wrestrict, PR 105329) on "(" + to_string(...).
        std::string r = "(";
        r += std::to_string(d);
        r += ", ";
        r += std::to_string(h);
        r += ", ";
        r += std::to_string(w);
        r += ")";
        return r;
    }
};

/// What a Conv3d fixes at compile time (a structural type: usable as a template
/// argument).  Members left `dynamic` are taken from the constructor at run time;
/// `vf::Conv3d<>` (all dynamic) is the runtime-shaped module.
///   vf::Conv3d<vf::conv_spec{.in = 64, .out = 128, .kernel = 3, .stride = 1, .padding = 1}>
struct conv_spec {
    index_t in = dynamic, out = dynamic;
    size3 kernel = dynamic, stride = dynamic, padding = dynamic, dilation = dynamic;
    constexpr bool operator==(const conv_spec&) const noexcept = default;
};

/// Output extent of one spatial dimension (PyTorch's formula).
constexpr index_t conv_out_extent(index_t in, index_t k, index_t s, index_t p, index_t dil) noexcept
{
    return (in + 2 * p - dil * (k - 1) - 1) / s + 1;
}

/// The numbers a conv kernel runs on.  Each accessor returns a constant when the spec
/// fixes it (loops over it then have compile-time trip counts), the run-time value otherwise.
template <conv_spec S>
struct conv_geometry {
    static constexpr conv_spec spec = S;
    index_t in_, out_;
    size3 k_, s_, p_, dil_;

    constexpr index_t in() const noexcept
    {
        if constexpr (S.in != dynamic) return S.in;
        else return in_;
    }
    constexpr index_t out() const noexcept
    {
        if constexpr (S.out != dynamic) return S.out;
        else return out_;
    }
    /// Component I (0 = d, 1 = h, 2 = w) of a triple: the spec's value if fixed, else `rt`'s.
    template <size3 conv_spec::*F, int I>
    static constexpr index_t component(const size3& rt) noexcept
    {
        if constexpr ((S.*F)[I] != dynamic) return (S.*F)[I];
        else return rt[I];
    }
    template <int I>
    constexpr index_t k() const noexcept { return component<&conv_spec::kernel, I>(k_); }
    template <int I>
    constexpr index_t s() const noexcept { return component<&conv_spec::stride, I>(s_); }
    template <int I>
    constexpr index_t p() const noexcept { return component<&conv_spec::padding, I>(p_); }
    template <int I>
    constexpr index_t dil() const noexcept { return component<&conv_spec::dilation, I>(dil_); }
    /// Kernel taps k<0>() * k<1>() * k<2>().
    constexpr index_t taps() const noexcept { return k<0>() * k<1>() * k<2>(); }
    /// Output extents for input extents (d, h, w).
    constexpr std::array<index_t, 3> out_extents(const std::array<index_t, 3>& in) const noexcept
    {
        return {conv_out_extent(in[0], k<0>(), s<0>(), p<0>(), dil<0>()),
                conv_out_extent(in[1], k<1>(), s<1>(), p<1>(), dil<1>()),
                conv_out_extent(in[2], k<2>(), s<2>(), p<2>(), dil<2>())};
    }
};

} // namespace volfuse
