// The loop nest every batch-norm kernel runs on, over a channel_form (outer,
// channels, inner), written once (`walk`), and the two kinds of kernel body:
//   reduce_channels:    per-channel sums of K terms, accumulated in double;
//   transform_channels: an elementwise map with per-channel parameters.
// One template for static and dynamic extents and for all three layouts:
// channel-major forms (inner > 1, NCDHW) vectorize along the contiguous inner run
// with per-channel parameters broadcast; channel-minor forms (inner == 1, NDHWC) and
// blocked forms (nCdhw16c) vectorize across channels with parameters loaded as vectors.  Tails use partial
// loads/stores and lane masks, so every element goes through the same vector
// arithmetic (bits do not depend on where an element sits).  Element type T (float or
// double) is a template parameter of every kernel, deduced from the pointers: one template
// per kernel, vectors of simd::lanes<T>.
#pragma once

#include "../core/config.hpp"

#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>

#include "../parallel/threads.hpp"
#include "../shape/layout.hpp"
#include "../simd/vec.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS::kernels {

using simd::fvec;
using simd::width;

/// N vectors of T; N source pointers of T.
template <std::size_t N, class T = float>
using vecs = std::array<simd::vec<T>, N>;
template <std::size_t N>
using fvecs = vecs<N, float>;
template <std::size_t N, class T = float>
using srcs = std::array<const T*, N>;

/// Pixels per block of a channel-minor reduction.  Blocks are fixed by the shape,
/// never by the thread count, and their partial sums are added in block order: the
/// result is the same for any number of threads.
inline constexpr index_t reduce_block = 2048;

/// Per-term stride (doubles) of reduction results over C channels.
constexpr index_t reduce_stride(index_t channels) noexcept { return (channels + 15) / 16 * 16; }

/// Doubles of workspace a K-term reduction over form f needs: the results, plus one
/// partial per pixel block for channel-minor forms.
template <class Form>
constexpr index_t reduce_workspace(const Form& f, index_t K) noexcept
{
    const index_t per = K * reduce_stride(value_of(f.channels));
    if constexpr (Form::channel_minor) return per * (1 + (value_of(f.outer) + reduce_block - 1) / reduce_block);
    else return per;
}

/// Channel groups processed as a unit: one channel at a time for channel-major
/// forms (its slice is still in cache between the passes; channels run in parallel),
/// one 16-channel block at a time for blocked forms (likewise), all channels at once
/// for channel-minor forms (a pixel holds every channel; the kernels inside run in
/// parallel over pixel blocks).
template <class Form, class Body>
void for_channel_groups(const Form& f, Body&& body)
{
    const index_t C = value_of(f.channels);
    if constexpr (Form::channel_minor) {
        body(index_t{0}, C);
    } else if constexpr (Form::blocked) {
        constexpr index_t B = Form::block;
        parallel::parallel_for(f.blocks(), C * f.count(),
                               [&](index_t cb) { body(cb * B, std::min(C, (cb + 1) * B)); });
    } else {
        parallel::parallel_for(C, C * f.count(), [&](index_t c) { body(c, c + 1); });
    }
}

/// One vector position of a walk: `offset` of its first element; `c` the channel of
/// every lane (channel-major) or of lane 0, lane l being channel c + l (channel-minor, blocked);
/// `lanes` the lanes that are real (fewer than `width` only in a tail).
struct vec_pos {
    index_t offset, c, lanes;
};

template <int U>
using slot = std::integral_constant<int, U>;

/// How many channel vectors a channel-minor walk unrolls at compile time (static C only):
/// enough for C = 64 floats in AVX-512 (4 vectors) or AVX2 (8), few enough that per-channel
/// double accumulators stay in registers.
inline constexpr index_t max_unrolled_channel_vectors = 8;

template <class Form, class T = float>
inline constexpr bool unrolled_channels =
    Form::channel_minor && static_value_v<decltype(Form::channels)> != dynamic &&
    (static_value_v<decltype(Form::channels)> + simd::lanes<T> - 1) / simd::lanes<T> <= max_unrolled_channel_vectors;

/// The loop nest over channels [c0, c1) and outer indices [o0, o1) of a channel form, written once:
///   channel-major: for c { begin(c, c+1); for o { the inner run two vectors at a time
///                  (visit's slot 0 and 1: independent accumulator chains), then its tail }; end(c, c+1) }
///   blocked:       begin(block); for n { for pixel { the block's 16 channels as 16/width
///                  vectors, slot<j> } }; end(block)
///   channel-minor: begin(0, C); for o { vectors across all C channels }; end(0, C).  With
///                  static C the channel loop is unrolled at compile time and visit gets the
///                  vector's index as slot<j>; otherwise slot is the run-time index.
/// Static extents make every trip count a compile-time constant.  Vectors of simd::lanes<T>.
template <class T, class Form, class Begin, class Visit, class End>
void walk(const Form& f, index_t c0, index_t c1, index_t o0, index_t o1, Begin&& begin, Visit&& visit,
          End&& end) noexcept
{
    constexpr index_t width = simd::lanes<T>;
    const index_t C = value_of(f.channels), I = value_of(f.inner);
    if constexpr (Form::channel_minor) {
        // A pixel holds every channel: channel-minor walks always cover [0, C).
        (void)c0, (void)c1;
        begin(index_t{0}, C);
        if constexpr (unrolled_channels<Form, T>) {
            constexpr index_t CS = static_value_v<decltype(Form::channels)>;
            constexpr index_t nv = (CS + width - 1) / width;
            for (index_t o = o0; o < o1; ++o) {
                const index_t base = o * CS;
                [&]<int... J>(std::integer_sequence<int, J...>) {
                    (visit(vec_pos{base + J * width, J * width, std::min<index_t>(width, CS - J * width)}, slot<J>{}), ...);
                }(std::make_integer_sequence<int, static_cast<int>(nv)>{});
            }
        } else {
            for (index_t o = o0; o < o1; ++o)
                for (index_t cv = 0; cv < C; cv += width)
                    visit(vec_pos{o * C + cv, cv, std::min<index_t>(width, C - cv)}, cv / width);
        }
        end(index_t{0}, C);
    } else if constexpr (Form::blocked) {
        // [c0, c1) is one block; its 16 channels are contiguous at every pixel.
        constexpr index_t B = Form::block;
        const index_t CB = f.blocks(), cb = c0 / B;
        begin(c0, c1);
        for (index_t o = o0; o < o1; ++o)
            for (index_t i = 0; i < I; ++i) {
                const index_t base = ((o * CB + cb) * I + i) * B;
                [&]<int... J>(std::integer_sequence<int, J...>) {
                    auto one = [&](auto j) {
                        const index_t lanes = std::min<index_t>(width, c1 - c0 - decltype(j)::value * width);
                        if (lanes > 0) // the last block's padding lanes are neither read nor written
                            visit(vec_pos{base + decltype(j)::value * width, c0 + decltype(j)::value * width, lanes}, j);
                    };
                    (one(slot<J>{}), ...);
                }(std::make_integer_sequence<int, static_cast<int>(B / width)>{});
            }
        end(c0, c1);
    } else {
        for (index_t c = c0; c < c1; ++c) {
            begin(c, c + 1);
            for (index_t o = o0; o < o1; ++o) {
                const index_t base = (o * C + c) * I;
                index_t i = 0;
                for (; i + 2 * width <= I; i += 2 * width) {
                    visit(vec_pos{base + i, c, width}, slot<0>{});
                    visit(vec_pos{base + i + width, c, width}, slot<1>{});
                }
                if (i + width <= I) {
                    visit(vec_pos{base + i, c, width}, slot<0>{});
                    i += width;
                }
                if (i < I) visit(vec_pos{base + i, c, I - i}, slot<1>{});
            }
            end(c, c + 1);
        }
    }
}

/// Loads S source vectors at a position (partial loads in tails: never past the end).
template <std::size_t S, class T>
vecs<S, T> load_sources(const srcs<S, T>& in, const vec_pos& p) noexcept
{
    vecs<S, T> v;
    for (std::size_t s = 0; s < S; ++s)
        v[s] = p.lanes == simd::lanes<T> ? simd::load(in[s] + p.offset) : simd::load_partial(in[s] + p.offset, p.lanes);
    return v;
}

/// Per-channel parameters as vectors: broadcast once per channel for channel-major
/// forms (`begin`), loaded per position across channels for channel-minor and blocked forms.
template <class Form, std::size_t P, class T = float>
struct channel_params {
    const srcs<P, T>& prm;
    vecs<P, T> cached{};

    static constexpr bool across = Form::channel_minor || Form::blocked; // lanes are channels

    void begin(index_t c) noexcept
    {
        if constexpr (!across)
            for (std::size_t q = 0; q < P; ++q) cached[q] = simd::vec<T>(prm[q][c]);
    }
    vecs<P, T> at(const vec_pos& p) const noexcept
    {
        if constexpr (across) {
            vecs<P, T> v;
            for (std::size_t q = 0; q < P; ++q)
                v[q] = p.lanes == simd::lanes<T> ? simd::load(prm[q] + p.c) : simd::load_partial(prm[q] + p.c, p.lanes);
            return v;
        } else {
            return cached;
        }
    }
};

/// How reduce_channels accumulates its K float terms: the first `Doubles` widened into double one
/// by one (simd::dacc: what a sum that must stay exact to double precision needs, e.g. the one a
/// mean comes from), the others in float runs of `Run` per lane, each run then added in double
/// (simd::blocked_acc: one float add per term in the hot loop).  Double terms are all added in
/// double one by one, whatever A says.
template <std::size_t Doubles, int Run = 32>
struct accumulation {
    static constexpr std::size_t doubles = Doubles;
    static constexpr int run = Run;
};
using all_double = accumulation<std::size_t(-1)>;

/// One slot's accumulators of K terms of T under accumulation A (k is a compile-time constant
/// after unrolling, so each add is one branch-free accumulator update).
template <std::size_t K, class A, class T = float>
struct term_accumulators {
    static constexpr std::size_t D = std::is_same_v<T, float> ? std::min(K, A::doubles) : K;
    std::array<simd::wide_acc<T>, D> d{};
    std::array<simd::blocked_acc<A::run>, K - D> f{};
    void add(std::size_t k, simd::vec<T> v) noexcept
    {
        if constexpr (D == K) d[k].add(v);
        else if (k < D) d[k].add(v);
        else f[k - D].add(v);
    }
    simd::wide_acc<T> widened(std::size_t k) const noexcept
    {
        if constexpr (D == K) return d[k];
        else return k < D ? d[k] : f[k - D].widened();
    }
};

/// out[k * stride + c] = sum over the channel's elements of term(x..., p...)[k], c in [c0, c1),
/// each term summed in double as accumulation A says.  `out` is reduce_workspace(f, K) doubles.
/// `term(const vecs<S, T>& in, const vecs<P, T>& prm) -> vecs<K, T>`.
/// Accumulators: channel-major, two chains per term in registers; blocked, and
/// channel-minor with static C, one per channel in registers; channel-minor with
/// dynamic C, in memory.
/// Channel-minor forms reduce fixed pixel blocks in parallel into partials after
/// `out`, then add the partials in block order.
template <std::size_t K, std::size_t S, std::size_t P, class A = all_double, class T, class Form, class Term>
void reduce_channels(const Form& f, index_t c0, index_t c1, const srcs<S, T>& in, const srcs<P, T>& prm, Term&& term,
                     double* out, index_t stride) noexcept
{
    using V = simd::vec<T>;
    constexpr index_t width = simd::lanes<T>;
    constexpr bool in_memory = Form::channel_minor && !unrolled_channels<Form, T>;
    constexpr std::size_t slots = [] {
        if constexpr (Form::blocked) return static_cast<std::size_t>(Form::block / width);
        else if constexpr (!Form::channel_minor) return std::size_t{2};
        else if constexpr (in_memory) return std::size_t{1};
        else return static_cast<std::size_t>((static_value_v<decltype(Form::channels)> + width - 1) / width);
    }();
    constexpr bool per_lane = Form::channel_minor || Form::blocked; // accumulators hold one channel per lane
    const index_t O = value_of(f.outer);
    // One walk over outer [o0, o1) into `dst` (stride as out); channel-major: per channel.
    auto reduce_range = [&](index_t ca, index_t cb, index_t o0, index_t o1, double* dst) {
        channel_params<Form, P, T> params{prm};
        std::array<term_accumulators<K, A, T>, slots> acc{};
        walk<T>(
            f, ca, cb, o0, o1,
            [&](index_t a, index_t b) {
                params.begin(a);
                acc = {};
                if constexpr (in_memory) // per-channel accumulators padded to whole vectors
                    for (std::size_t k = 0; k < K; ++k)
                        std::fill(dst + k * stride + a, dst + k * stride + a + (b - a + width - 1) / width * width, 0.0);
            },
            [&](const vec_pos& p, auto u) {
                vecs<K, T> t = term(load_sources(in, p), params.at(p));
                if (p.lanes != width) {
                    const auto m = simd::first_lanes<T>(p.lanes);
                    for (auto& tk : t) tk = xsimd::select(m, tk, V(T(0)));
                }
                for (std::size_t k = 0; k < K; ++k) {
                    if constexpr (in_memory) {
                        simd::wide_acc<T>::add_to(dst + k * stride + p.c, t[k]);
                    } else {
                        acc[decltype(u)::value].add(k, t[k]);
                    }
                }
            },
            [&](index_t a, index_t) {
                if constexpr (!per_lane) {
                    for (std::size_t k = 0; k < K; ++k)
                        dst[k * stride + a] = simd::wide_acc<T>::total(acc[0].widened(k), acc[1].widened(k));
                } else if constexpr (!in_memory) {
                    for (std::size_t j = 0; j < slots; ++j)
                        for (std::size_t k = 0; k < K; ++k)
                            acc[j].widened(k).store(dst + k * stride + a + static_cast<index_t>(j) * width);
                }
            });
    };
    if constexpr (Form::channel_minor) {
        const index_t blocks = (O + reduce_block - 1) / reduce_block;
        const index_t per = static_cast<index_t>(K) * stride;
        double* partial = out + per;
        parallel::parallel_for(blocks, O * value_of(f.channels), [&](index_t b) {
            reduce_range(c0, c1, b * reduce_block, std::min(O, (b + 1) * reduce_block), partial + b * per);
        });
        // The fixed reduction tree: partials added in block order, every channel the same way.
        std::fill(out, out + per, 0.0);
        for (index_t b = 0; b < blocks; ++b)
            for (index_t i = 0; i < per; i += simd::dvec::size)
                (simd::dvec::load_unaligned(out + i) + simd::dvec::load_unaligned(partial + b * per + i))
                    .store_unaligned(out + i);
    } else if constexpr (Form::blocked) {
        for (index_t c = c0; c < c1; c += Form::block) reduce_range(c, std::min(c1, c + Form::block), 0, O, out);
    } else {
        reduce_range(c0, c1, 0, O, out);
    }
}

/// Output bytes from which transforms that do not write in place store non-temporally
/// (half this machine kind's 32 MiB L3): an output that large is evicted before the
/// next layer could read it from cache, so the stores skip the cache and the
/// read-for-ownership.  Smaller outputs stay cached for whoever reads them next.
/// Build knob: -DVOLFUSE_STREAM_MIN_BYTES=<bytes> (a huge value turns streaming off).
#ifndef VOLFUSE_STREAM_MIN_BYTES
#define VOLFUSE_STREAM_MIN_BYTES (16ll << 20)
#endif
inline constexpr index_t stream_min_bytes = VOLFUSE_STREAM_MIN_BYTES;

/// Whether a transform writing `bytes` to `out` from inputs `in` streams its stores.
template <std::size_t S, class T>
bool streams(const srcs<S, T>& in, const T* out, index_t bytes) noexcept
{
    for (const T* p : in)
        if (p == out) return false; // in place: the line is in cache already, nothing to save
    return bytes >= stream_min_bytes;
}

/// Stores one result vector of a transform: partial in a tail, non-temporal when the transform
/// streams (streams()) and o is aligned, plain otherwise.
template <class T>
inline void store_result(T* o, simd::vec<T> r, index_t lanes, bool stream) noexcept
{
    if (lanes != simd::lanes<T>) simd::store_partial(o, r, lanes);
    else if (stream && simd::stream_aligned(o)) simd::store_stream(o, r);
    else simd::store(o, r);
}

/// out = fn(in..., prm...) elementwise over channels [c0, c1), in parallel over channels
/// (channel-major) or pixel blocks (channel-minor).  An output may be the same memory
/// as an input (each element is read before it is written).  Large out-of-place outputs
/// are stored non-temporally (streams()).
template <std::size_t S, std::size_t P, class Form, class T, class Fn>
void transform_channels(const Form& f, index_t c0, index_t c1, const srcs<S, T>& in, const srcs<P, T>& prm, T* out,
                        Fn&& fn) noexcept
{
    const bool stream = streams(in, out, f.count() * value_of(f.channels) * static_cast<index_t>(sizeof(T)));
    auto transform_range = [&](index_t ca, index_t cb, index_t o0, index_t o1) {
        channel_params<Form, P, T> params{prm};
        walk<T>(
            f, ca, cb, o0, o1, [&](index_t a, index_t) { params.begin(a); },
            [&](const vec_pos& p, auto) {
                const simd::vec<T> r = fn(load_sources(in, p), params.at(p));
                store_result(out + p.offset, r, p.lanes, stream);
            },
            [](index_t, index_t) {});
        if (stream) simd::stream_fence();
    };
    const index_t O = value_of(f.outer);
    if constexpr (Form::channel_minor) {
        const index_t blocks = (O + reduce_block - 1) / reduce_block;
        parallel::parallel_for(blocks, O * value_of(f.channels), [&](index_t b) {
            transform_range(c0, c1, b * reduce_block, std::min(O, (b + 1) * reduce_block));
        });
    } else if constexpr (Form::blocked) {
        constexpr index_t B = Form::block;
        const index_t first = c0 / B, blocks = (c1 + B - 1) / B - first;
        parallel::parallel_for(blocks, (c1 - c0) * f.count(), [&](index_t i) {
            const index_t ca = std::max(c0, (first + i) * B);
            transform_range(ca, std::min(c1, (first + i + 1) * B), 0, O);
        });
    } else {
        parallel::parallel_for(c1 - c0, (c1 - c0) * f.count(),
                               [&](index_t i) { transform_range(c0 + i, c0 + i + 1, 0, O); });
    }
}

} // namespace volfuse::kernels
