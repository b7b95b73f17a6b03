// The loop nest every batch-norm kernel runs on, over a channel_form (outer,
// channels, inner), written once (`walk`), and the two kinds of kernel body:
//   reduce_channels:    per-channel sums of K float terms, accumulated in double;
//   transform_channels: an elementwise map with per-channel parameters.
// One template for static and dynamic extents and for both plain layouts:
// channel-major forms (inner > 1, NCDHW) vectorize along the contiguous inner run
// with per-channel parameters broadcast; channel-minor forms (inner == 1, NDHWC)
// vectorize across channels with parameters loaded as vectors.  Tails use partial
// loads/stores and lane masks, so every element goes through the same vector
// arithmetic (bits do not depend on where an element sits).
#pragma once

#include <algorithm>
#include <array>

#include "../shape/layout.hpp"
#include "../simd/vec.hpp"

namespace volfuse::kernels {

using simd::fvec;
using simd::width;

template <std::size_t N>
using fvecs = std::array<fvec, N>;
template <std::size_t N>
using srcs = std::array<const float*, N>;

/// Work size (doubles) a reduction of K terms over C channels needs.
constexpr index_t reduce_stride(index_t channels) noexcept { return (channels + 15) / 16 * 16; }

/// Channel groups processed as a unit: one channel at a time for channel-major
/// forms (its slice is still in cache between the passes), all channels at once
/// for channel-minor forms (a pixel holds every channel).
template <class Form, class Body>
void for_channel_groups(const Form& f, Body&& body)
{
    const index_t C = value_of(f.channels);
    if constexpr (Form::channel_minor) {
        body(index_t{0}, C);
    } else {
        for (index_t c = 0; c < C; ++c) body(c, c + 1);
    }
}

/// One vector position of a walk: `offset` of its first element; `c` the channel of
/// every lane (channel-major) or of lane 0, lane l being channel c + l (channel-minor);
/// `lanes` the lanes that are real (fewer than `width` only in a tail).
struct vec_pos {
    index_t offset, c, lanes;
};

/// The loop nest over channels [c0, c1) of a channel form, written once:
///   channel-major: for c { begin(c, c+1); for o { vectors along the inner run, then its tail }; end(c, c+1) }
///   channel-minor: begin(c0, c1); for o { vectors across channels, then the channel tail }; end(c0, c1)
/// Extents that are static make the trip counts compile-time constants.
template <class Form, class Begin, class Visit, class End>
void walk(const Form& f, index_t c0, index_t c1, Begin&& begin, Visit&& visit, End&& end) noexcept
{
    const index_t C = value_of(f.channels), I = value_of(f.inner), O = value_of(f.outer);
    if constexpr (Form::channel_minor) {
        begin(c0, c1);
        for (index_t o = 0; o < O; ++o)
            for (index_t cv = c0; cv < c1; cv += width) visit(vec_pos{o * C + cv, cv, std::min<index_t>(width, c1 - cv)});
        end(c0, c1);
    } else {
        for (index_t c = c0; c < c1; ++c) {
            begin(c, c + 1);
            for (index_t o = 0; o < O; ++o) {
                const index_t base = (o * C + c) * I;
                index_t i = 0;
                for (; i + width <= I; i += width) visit(vec_pos{base + i, c, width});
                if (i < I) visit(vec_pos{base + i, c, I - i});
            }
            end(c, c + 1);
        }
    }
}

/// Loads S source vectors at a position (partial loads in tails: never past the end).
template <std::size_t S>
fvecs<S> load_sources(const srcs<S>& in, const vec_pos& p) noexcept
{
    fvecs<S> v;
    for (std::size_t s = 0; s < S; ++s)
        v[s] = p.lanes == width ? simd::load(in[s] + p.offset) : simd::load_partial(in[s] + p.offset, p.lanes);
    return v;
}

/// Per-channel parameters as vectors: broadcast once per channel for channel-major
/// forms (`begin`), loaded per position across channels for channel-minor forms.
template <class Form, std::size_t P>
struct channel_params {
    const srcs<P>& prm;
    fvecs<P> cached{};

    void begin(index_t c) noexcept
    {
        if constexpr (!Form::channel_minor)
            for (std::size_t q = 0; q < P; ++q) cached[q] = fvec(prm[q][c]);
    }
    fvecs<P> at(const vec_pos& p) const noexcept
    {
        if constexpr (Form::channel_minor) {
            fvecs<P> v;
            for (std::size_t q = 0; q < P; ++q)
                v[q] = p.lanes == width ? simd::load(prm[q] + p.c) : simd::load_partial(prm[q] + p.c, p.lanes);
            return v;
        } else {
            return cached;
        }
    }
};

/// out[k * stride + c] = sum over the channel's elements of term(x..., p...)[k], c in [c0, c1),
/// each float term widened and summed in double.
/// `term(const fvecs<S>& in, const fvecs<P>& prm) -> fvecs<K>`.
template <std::size_t K, std::size_t S, std::size_t P, class Form, class Term>
void reduce_channels(const Form& f, index_t c0, index_t c1, const srcs<S>& in, const srcs<P>& prm, Term&& term,
                     double* out, index_t stride) noexcept
{
    channel_params<Form, P> params{prm};
    std::array<simd::dacc, K> acc{}; // channel-major: one channel's sums, in registers
    walk(
        f, c0, c1,
        [&](index_t a, index_t b) {
            params.begin(a);
            if constexpr (Form::channel_minor) // per-channel accumulators in `out`, padded to whole vectors
                for (std::size_t k = 0; k < K; ++k)
                    std::fill(out + k * stride + a, out + k * stride + a + (b - a + width - 1) / width * width, 0.0);
            else
                acc = {};
        },
        [&](const vec_pos& p) {
            fvecs<K> t = term(load_sources(in, p), params.at(p));
            if (p.lanes != width) {
                const auto m = simd::first_lanes(p.lanes);
                for (auto& tk : t) tk = xsimd::select(m, tk, fvec(0.f));
            }
            for (std::size_t k = 0; k < K; ++k) {
                if constexpr (Form::channel_minor) {
                    double* a = out + k * stride + p.c;
                    const simd::dpair w = simd::widen(t[k]);
                    (simd::dvec::load_unaligned(a) + w.lo).store_unaligned(a);
                    (simd::dvec::load_unaligned(a + simd::dvec::size) + w.hi).store_unaligned(a + simd::dvec::size);
                } else {
                    acc[k].add(t[k]);
                }
            }
        },
        [&](index_t a, index_t) {
            if constexpr (!Form::channel_minor)
                for (std::size_t k = 0; k < K; ++k) out[k * stride + a] = acc[k].sum();
        });
}

/// out = fn(in..., prm...) elementwise over channels [c0, c1).  An output may be
/// the same memory as an input (each element is read before it is written).
template <std::size_t S, std::size_t P, class Form, class Fn>
void transform_channels(const Form& f, index_t c0, index_t c1, const srcs<S>& in, const srcs<P>& prm, float* out,
                        Fn&& fn) noexcept
{
    channel_params<Form, P> params{prm};
    walk(
        f, c0, c1, [&](index_t a, index_t) { params.begin(a); },
        [&](const vec_pos& p) {
            const fvec r = fn(load_sources(in, p), params.at(p));
            if (p.lanes == width) simd::store(out + p.offset, r);
            else simd::store_partial(out + p.offset, r, p.lanes);
        },
        [](index_t, index_t) {});
}

} // namespace volfuse::kernels
