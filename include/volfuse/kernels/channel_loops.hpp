// The two loop nests every batch-norm kernel is made of, over a channel_form
// (outer, channels, inner):
//   reduce_channels:    per-channel sums of K float terms, accumulated in double;
//   transform_channels: an elementwise map with per-channel parameters.
// Both are one template for static and dynamic extents and for both plain
// layouts: channel-major forms (inner > 1, NCDHW) vectorize along the contiguous
// inner run with per-channel parameters broadcast; channel-minor forms (inner == 1,
// NDHWC) vectorize across channels with parameters loaded as vectors.  Tails use
// partial loads/stores and lane masks, so every element goes through the same
// vector arithmetic (bits do not depend on where an element sits).
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

/// out[k * stride + c] = sum over the channel's elements of term(x..., p...)[k], c in [c0, c1).
/// `term(const fvecs<S>& in, const fvecs<P>& prm) -> fvecs<K>`.
template <std::size_t K, std::size_t S, std::size_t P, class Form, class Term>
void reduce_channels(const Form& f, index_t c0, index_t c1, const srcs<S>& in, const srcs<P>& prm, Term&& term,
                     double* out, index_t stride) noexcept
{
    const auto C = f.channels;
    const auto I = f.inner;
    const index_t O = value_of(f.outer);
    if constexpr (Form::channel_minor) {
        // Per-channel double accumulators live in `out` (padded to a whole vector).
        for (std::size_t k = 0; k < K; ++k)
            std::fill(out + k * stride + c0, out + k * stride + (c1 - c0 + width - 1) / width * width + c0, 0.0);
        for (index_t o = 0; o < O; ++o) {
            const index_t base = o * value_of(C);
            for (index_t cv = c0; cv < c1; cv += width) {
                const index_t rem = std::min<index_t>(width, c1 - cv);
                fvecs<S> v;
                fvecs<P> p;
                for (std::size_t s = 0; s < S; ++s)
                    v[s] = rem == width ? simd::load(in[s] + base + cv) : simd::load_partial(in[s] + base + cv, rem);
                for (std::size_t q = 0; q < P; ++q)
                    p[q] = rem == width ? simd::load(prm[q] + cv) : simd::load_partial(prm[q] + cv, rem);
                fvecs<K> t = term(v, p);
                if (rem != width) {
                    const auto m = simd::first_lanes(rem);
                    for (auto& tk : t) tk = xsimd::select(m, tk, fvec(0.f));
                }
                for (std::size_t k = 0; k < K; ++k) {
                    double* acc = out + k * stride + cv;
                    const simd::dpair w = simd::widen(t[k]);
                    (simd::dvec::load_unaligned(acc) + w.lo).store_unaligned(acc);
                    (simd::dvec::load_unaligned(acc + simd::dvec::size) + w.hi).store_unaligned(acc + simd::dvec::size);
                }
            }
        }
    } else {
        for (index_t c = c0; c < c1; ++c) {
            fvecs<P> p;
            for (std::size_t q = 0; q < P; ++q) p[q] = fvec(prm[q][c]);
            std::array<simd::dacc, K> acc{};
            for (index_t o = 0; o < O; ++o) {
                const index_t base = (o * value_of(C) + c) * value_of(I);
                index_t i = 0;
                for (; i + width <= value_of(I); i += width) {
                    fvecs<S> v;
                    for (std::size_t s = 0; s < S; ++s) v[s] = simd::load(in[s] + base + i);
                    const fvecs<K> t = term(v, p);
                    for (std::size_t k = 0; k < K; ++k) acc[k].add(t[k]);
                }
                if (i < value_of(I)) {
                    const index_t rem = value_of(I) - i;
                    fvecs<S> v;
                    for (std::size_t s = 0; s < S; ++s) v[s] = simd::load_partial(in[s] + base + i, rem);
                    const fvecs<K> t = term(v, p);
                    const auto m = simd::first_lanes(rem);
                    for (std::size_t k = 0; k < K; ++k) acc[k].add(xsimd::select(m, t[k], fvec(0.f)));
                }
            }
            for (std::size_t k = 0; k < K; ++k) out[k * stride + c] = acc[k].sum();
        }
    }
}

/// out = fn(in..., prm...) elementwise over channels [c0, c1).  An output may be
/// the same memory as an input (each element is read before it is written).
template <std::size_t S, std::size_t P, class Form, class Fn>
void transform_channels(const Form& f, index_t c0, index_t c1, const srcs<S>& in, const srcs<P>& prm, float* out,
                        Fn&& fn) noexcept
{
    const auto C = f.channels;
    const auto I = f.inner;
    const index_t O = value_of(f.outer);
    if constexpr (Form::channel_minor) {
        for (index_t o = 0; o < O; ++o) {
            const index_t base = o * value_of(C);
            for (index_t cv = c0; cv < c1; cv += width) {
                const index_t rem = std::min<index_t>(width, c1 - cv);
                fvecs<S> v;
                fvecs<P> p;
                if (rem == width) {
                    for (std::size_t s = 0; s < S; ++s) v[s] = simd::load(in[s] + base + cv);
                    for (std::size_t q = 0; q < P; ++q) p[q] = simd::load(prm[q] + cv);
                    simd::store(out + base + cv, fn(v, p));
                } else {
                    for (std::size_t s = 0; s < S; ++s) v[s] = simd::load_partial(in[s] + base + cv, rem);
                    for (std::size_t q = 0; q < P; ++q) p[q] = simd::load_partial(prm[q] + cv, rem);
                    simd::store_partial(out + base + cv, fn(v, p), rem);
                }
            }
        }
    } else {
        for (index_t c = c0; c < c1; ++c) {
            fvecs<P> p;
            for (std::size_t q = 0; q < P; ++q) p[q] = fvec(prm[q][c]);
            for (index_t o = 0; o < O; ++o) {
                const index_t base = (o * value_of(C) + c) * value_of(I);
                index_t i = 0;
                for (; i + width <= value_of(I); i += width) {
                    fvecs<S> v;
                    for (std::size_t s = 0; s < S; ++s) v[s] = simd::load(in[s] + base + i);
                    simd::store(out + base + i, fn(v, p));
                }
                if (i < value_of(I)) {
                    const index_t rem = value_of(I) - i;
                    fvecs<S> v;
                    for (std::size_t s = 0; s < S; ++s) v[s] = simd::load_partial(in[s] + base + i, rem);
                    simd::store_partial(out + base + i, fn(v, p), rem);
                }
            }
        }
    }
}

} // namespace volfuse::kernels
