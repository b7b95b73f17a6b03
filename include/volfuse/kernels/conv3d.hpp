// Direct Conv3d kernels on channels-last (NDHWC) data: forward, grad input, grad
// weight.  Each is one template over a conv_geometry (compile-time constants where
// the spec fixes them) with register-blocked SIMD tiles:
//   forward:      acc[PB output pixels along w][VB output-channel vectors]
//                 += broadcast(x[pixel][ic]) * w[tap][ic][oc vector]
//   grad input:   stride 1: the forward kernel on dy with the taps flipped and the weight
//                 transposed; other strides: a gather over the input pixels of one residue
//                 mod the stride, acc[PB pixels][VB input-channel vectors] +=
//                 broadcast(dy[output pixel][oc]) * w[tap][oc][ic vector]; no scatter either way
//   grad weight:  a GEMM over output pixels: acc[MB (tap, ic) rows][VB output-channel vectors]
//                 += broadcast(x_padded[pixel + tap][ic]) * dy[pixel][oc vector], kept in
//                 registers across a cache block of output rows
// A tile's accumulators stay in registers over the whole reduction (taps x channels).
// Work is split into tasks that own disjoint outputs and sum in a fixed order, so the
// bits do not depend on the number of threads.  FLOPs per output element: 2 * IC * taps.
#pragma once

#include "../core/config.hpp"

#include <algorithm>
#include <array>

#include "../expr/pointwise.hpp"
#include "../parallel/threads.hpp"
#include "../schedule/conv_schedule.hpp"
#include "../shape/conv_geometry.hpp"
#include "../simd/vec.hpp"
#include "moments.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS::kernels::conv {

// Every kernel is a template over the element type T (float or double: the same code, in
// vectors of simd::lanes<T>; `width` in a kernel is simd::lanes<T>).  Schedules count vectors,
// so a tile of VB vectors holds VB * width channels of either type.

/// This build's register limits (schedule/conv_schedule.hpp).
inline constexpr int acc_registers = conv_acc_registers;
inline constexpr int max_vectors = conv_max_vectors;

constexpr index_t round_up(index_t v, index_t m) noexcept { return (v + m - 1) / m * m; }

/// Pixels per tile for VB channel vectors.
template <int VB>
inline constexpr int pixels_for = conv_tile_pixels(VB);

/// Input channels up to which grad input is narrow (vectors over output channels; below).
inline constexpr index_t narrow_channels = 4;

/// Calls f.template operator()<ICN>() with ICN = g.in() when it is 1..narrow_channels (a
/// compile-time constant: loops over input channels unroll), ICN = 0 otherwise.  A spec that
/// fixes in_channels instantiates only its own case.
template <class G, class F>
void with_input_channels(const G& g, F&& f)
{
    constexpr index_t fixed = G::spec.in;
    if constexpr (fixed != dynamic) {
        f.template operator()< fixed <= narrow_channels ? static_cast<int>(fixed) : 0 > ();
    } else {
        const index_t IC = g.in();
        if (IC > narrow_channels) return f.template operator()<0>();
        [&]<int... I>(std::integer_sequence<int, I...>) {
            ((IC == I + 1 ? (f.template operator()<I + 1>(), 0) : 0), ...);
        }(std::make_integer_sequence<int, static_cast<int>(narrow_channels)>{});
    }
}

/// Extents of one NDHWC tensor's spatial part.
struct extents3 {
    index_t d, h, w;
};

/// Calls f.template operator()<V>() with V = n as a compile-time constant in [1, max_vectors].
template <class F>
void with_vectors(index_t n, F&& f)
{
    [&]<int... V>(std::integer_sequence<int, V...>) {
        ((n == V + 1 ? (f.template operator()<V + 1>(), 0) : 0), ...);
    }(std::make_integer_sequence<int, max_vectors>{});
}

/// Lanes per block of the blocked weight layouts (pack()): a tile's weights of one (tap, ic)
/// row are one contiguous run, so a block of rows fills L1 sets evenly (rows strided by a
/// power of two would crowd half the sets).
template <class T>
inline constexpr index_t pack_chunk = max_vectors * simd::lanes<T>;

/// Offset of (row r, lane l) in `rows` rows x `lanes` lanes (a multiple of W) blocked in
/// pack_chunk lanes: [lanes / pack_chunk][rows][pack_chunk], the last block narrower.
template <class T>
constexpr index_t blocked_offset(index_t rows, index_t lanes, index_t r, index_t l) noexcept
{
    constexpr index_t chunk = pack_chunk<T>;
    const index_t c0 = l / chunk * chunk;
    return c0 * rows + r * std::min(chunk, lanes - c0) + (l - c0);
}

/// Chunks of at most `per_chunk` (<= max_vectors) channel vectors over `channels`, never
/// across a pack_chunk boundary: f.template operator()<V>(c0).
template <class T, class F>
void for_channel_chunks(index_t channels, index_t per_chunk, F&& f)
{
    constexpr index_t width = simd::lanes<T>;
    const index_t vectors = (channels + width - 1) / width;
    for (index_t b0 = 0; b0 < vectors; b0 += max_vectors) {
        const index_t b1 = std::min<index_t>(vectors, b0 + max_vectors);
        for (index_t v0 = b0; v0 < b1; v0 += per_chunk)
            with_vectors(std::min<index_t>(per_chunk, b1 - v0), [&]<int V>() { f.template operator()<V>(v0 * width); });
    }
}

/// How pack() lays PyTorch's weight [OC][IC][KD][KH][KW] out for the kernels.
enum class packing {
    forward,            ///< rows (tap, IC) x lanes OCP, blocked (blocked_offset): the forward kernel's
    forward_rows,       ///< [tap][IC][OCP]: narrow grad input's (vectors over all of OC at once)
    transposed,         ///< [tap][OC][ICP]: grad input's gather
    flipped_transposed  ///< rows (KD-1-kd, KH-1-kh, KW-1-kw, OC) x lanes ICP, blocked: grad input as a forward conv of dY
};

/// Packs PyTorch's weight for the kernels (OCP / ICP: rounded up to whole vectors; padding
/// lanes are zero).
template <class G, class E>
void pack(const G& g, const E* w, E* out, packing how = packing::forward) noexcept
{
    constexpr index_t width = simd::lanes<E>;
    const index_t IC = g.in(), OC = g.out(), T = g.taps(); // (E: the element type)
    const bool tr = how == packing::transposed || how == packing::flipped_transposed;
    const bool blocked = how == packing::forward || how == packing::flipped_transposed;
    const index_t rows = tr ? OC : IC, lanes = round_up(tr ? IC : OC, width);
    std::fill(out, out + T * rows * lanes, E(0));
    for (index_t oc = 0; oc < OC; ++oc)
        for (index_t ic = 0; ic < IC; ++ic)
            for (index_t t = 0; t < T; ++t) {
                // taps are row-major (kd, kh, kw): the flipped tap is T-1-t
                const index_t tp = how == packing::flipped_transposed ? T - 1 - t : t;
                const index_t r = tp * rows + (tr ? oc : ic), l = tr ? ic : oc;
                out[blocked ? blocked_offset<E>(T * rows, lanes, r, l) : r * lanes + l] = w[(oc * IC + ic) * T + t];
            }
}

/// Valid output positions along one dimension for tap k: o with 0 <= o*s - p + k*dil < in,
/// as [lo, hi) clipped to [0, out).
struct range {
    index_t lo, hi;
};
constexpr range valid_outputs(index_t in, index_t out, index_t s, index_t p, index_t off) noexcept
{
    // o*s >= p - off  and  o*s <= in - 1 + p - off
    const index_t a = p - off, b = in - 1 + p - off;
    const index_t lo = a <= 0 ? 0 : (a + s - 1) / s;
    const index_t hi = b < 0 ? 0 : b / s + 1;
    return {std::max<index_t>(0, lo), std::min(out, hi)};
}

// --- forward -------------------------------------------------------------------------

/// Zeros read by a border tile's pixels for the taps whose input lies in the padding along w:
/// each such term is 0 * w, as PyTorch's zero padding defines it (finite weights: the sum is
/// the one over the valid taps, bit for bit).  A reduction block spans at most
/// max_block_channels input channels.
inline constexpr index_t max_block_channels = 4096;
template <class T>
alignas(64) inline constexpr T zero_row[max_block_channels]{};

/// Stores a forward tile's first npix pixels: bias, epilogue, the store (partial at the channel
/// tail), statistics.  Inlined: the accumulators must stay in registers.
template <int PB, int VB, class Epi, class Stats, class T>
[[gnu::always_inline]] inline void store_forward_tile(simd::vec<T> (&acc)[PB][VB], index_t npix, index_t OC,
                                                      const T* bias, index_t oc0, T* yrow, index_t ow0, Epi epi,
                                                      Stats& stats) noexcept
{
    constexpr index_t width = simd::lanes<T>;
    for (int p = 0; p < PB; ++p) {
        if (p >= npix) break;
        T* out = yrow + (ow0 + p) * OC + oc0;
        for (int j = 0; j < VB; ++j) {
            const index_t lanes = std::min<index_t>(width, OC - oc0 - j * width);
            acc[p][j] = epi(bias ? acc[p][j] + simd::load(bias + oc0 + j * width) : acc[p][j]);
            if (lanes == width) simd::store(out + j * width, acc[p][j]);
            else simd::store_partial(out + j * width, acc[p][j], lanes);
        }
    }
    stats.template add_tile<PB, VB>(acc, npix, oc0);
}

/// One reduction step of a broadcast tile: acc[p][j] += broadcast(scalar(p)) * w[j * width..]
/// over its PB pixels and VB vectors; with Masked, pixel p's fmas only where on[p] (the scalar
/// then read at a valid address; `on` is not read otherwise).  The forward's step over one
/// (tap, ic) and the gather's over one (tap, oc).
template <int PB, int VB, bool Masked, class S, class T>
[[gnu::always_inline]] inline void broadcast_fmas(simd::vec<T> (&acc)[PB][VB], const T* w, S&& scalar,
                                                  const simd::mask<T>* on = nullptr) noexcept
{
    using fvec = simd::vec<T>;
    constexpr index_t width = simd::lanes<T>;
    fvec wv[VB];
    #pragma GCC unroll 32
    for (int j = 0; j < VB; ++j) wv[j] = simd::load(w + j * width);
    #pragma GCC unroll 32
    for (int p = 0; p < PB; ++p) {
        const fvec b(scalar(p));
        #pragma GCC unroll 32
        for (int j = 0; j < VB; ++j)
            acc[p][j] = Masked ? simd::fma_where(on[p], b, wv[j], acc[p][j]) : simd::fma(b, wv[j], acc[p][j]);
    }
}

/// How many tiles of PB pixels (the rest PBb wide) cover a row of w output pixels with the
/// fewest pixel slots (a tile costs its width: slots past the row's end are wasted FMAs), then
/// the fewest tiles: with 6- and 5-pixel tiles 16 = 6 + 5 + 5 and 32 = 2 x 6 + 4 x 5, no slot
/// wasted (PBb: conv_narrow_tile_pixels).  Tiles near the padding are as wide as the others
/// (their pixels read zeros there), so rows of 16-32 pixels, most of whose tiles touch the
/// padding, run at the interior's rate.
constexpr index_t row_cover(index_t w, index_t PB, index_t PBb) noexcept
{
    index_t best = 0, best_slots = -1, best_tiles = 0;
    for (index_t a = 0; a <= (w + PB - 1) / PB; ++a) {
        const index_t rest = std::max<index_t>(0, w - a * PB), b = (rest + PBb - 1) / PBb;
        const index_t slots = a * PB + b * PBb;
        if (best_slots < 0 || slots < best_slots || (slots == best_slots && a + b < best_tiles))
            best = a, best_slots = slots, best_tiles = a + b;
    }
    return best;
}
static_assert(row_cover(16, 6, 5) == 1 && row_cover(32, 6, 5) == 2 && row_cover(16, 6, 4) == 2 &&
              row_cover(3, 6, 4) == 0 && row_cover(5, 6, 4) == 1 && row_cover(64, 6, 4) == 10);

/// The taps of one output row (od, oh) whose input rows lie inside the image (every kw), in
/// (kd, kh, kw) order: offsets of their input pixel from the row's first window origin (x:
/// relative to `base`, the offset of input pixel (od*s - p, oh*s - p, 0) in the image, which
/// may lie in the padding), their weight row (w: tap * IC), and the output pixels [lo, hi) of
/// the row whose input pixel for the tap lies inside along w.  Tiles then run the whole
/// reduction as one loop (GCC keeps the accumulators in registers only across a tile's
/// innermost loop: nested tap loops spill them once per inner loop).  The table depends on
/// the row only through which kd and kh are valid, so rows inside the image share one: set()
/// refills it only when that changes.
struct row_taps {
    static constexpr index_t capacity = 343; // 7x7x7; larger kernels are walked in segments
    index_t n = 0, base = 0;
    index_t x[capacity], w[capacity], lo[capacity], hi[capacity];
    index_t key[5] = {-1, -1, -1, -1, -1}; // valid kd and kh ranges and t0 the table was filled for

    /// The table of taps [t0, t1) (t1 - t0 <= capacity) for row (od, oh).
    template <class G>
    void set(const G& g, extents3 in, extents3 out, index_t od, index_t oh, index_t t0, index_t t1) noexcept
    {
        const index_t IC = g.in(), KD = g.template k<0>(), KH = g.template k<1>(), KW = g.template k<2>();
        const index_t dd = g.template dil<0>(), dh = g.template dil<1>(), dw = g.template dil<2>();
        const index_t id0 = od * g.template s<0>() - g.template p<0>(), ih0 = oh * g.template s<1>() - g.template p<1>();
        base = (id0 * in.h + ih0) * in.w * IC;
        // Valid kd: 0 <= id0 + kd*dd < in.d (a range, as id grows with kd); kh likewise.
        auto valid = [](index_t i0, index_t dil, index_t extent, index_t K) {
            const index_t lo = i0 >= 0 ? 0 : (-i0 + dil - 1) / dil;
            const index_t hi = extent - i0 <= 0 ? 0 : (extent - i0 + dil - 1) / dil;
            return std::array<index_t, 2>{std::min(lo, K), std::max(std::min(lo, K), std::min(hi, K))};
        };
        const auto vd = valid(id0, dd, in.d, KD), vh = valid(ih0, dh, in.h, KH);
        const index_t k[5] = {vd[0], vd[1], vh[0], vh[1], t0};
        if (std::equal(k, k + 5, key)) return;
        std::copy(k, k + 5, key);
        n = 0;
        for (index_t t = t0; t < t1; ++t) {
            const index_t kd = t / (KH * KW), kh = t / KW % KH, kw = t % KW;
            if (kd < vd[0] || kd >= vd[1] || kh < vh[0] || kh >= vh[1]) continue;
            x[n] = ((kd * dd * in.h + kh * dh) * in.w + kw * dw) * IC;
            w[n] = t * IC;
            const range r = valid_outputs(in.w, out.w, g.template s<2>(), g.template p<2>(), kw * dw);
            lo[n] = r.lo;
            hi[n] = r.hi;
            ++n;
        }
    }
};

/// A forward tile over one block of its reduction: output pixels [ow0, ow0 + npix) of a row,
/// channels [oc0, oc0 + VB * width) (one tile of pack()'s blocked layout), taps [k0, k1) of the
/// row's tap table, input channels [ic0, ic1) of each (ICN > 0: 1-4 channels fixed at compile
/// time, whole taps).  The pixels whose input for a tap lies in the padding along w (and those
/// past npix) read zeros (zero_row): every tile runs the same unmasked fmas, wherever it lies
/// in the row.  `first`: the accumulators start at zero, else from the partial sums an earlier
/// block stored in y; `last`: bias, epilogue, statistics and the final store, else the partial
/// sums are stored as they are.  Float stores
/// and loads are exact, so each output keeps one fma chain over its (kd, kh, kw, ic) inside the
/// image along d and h, in that order: the same bits whatever the tiling or blocking.  Not
/// inlined: the blocked loop calls it from several places, and inlined copies of every (PB,
/// VB, epilogue, statistics) instantiation cost more compile time than a call per tile costs
/// run time.
template <int PB, int VB, int ICN, class G, class Epi, class Stats, class T>
[[gnu::noinline]] void forward_tile_taps(const G& g, const T* xn, const row_taps& t, index_t k0, index_t k1,
                                         index_t ic0, index_t ic1, bool first, bool last, index_t ow0, index_t npix,
                                         const T* wp, const T* bias, index_t oc0, T* yrow, Epi epi,
                                         Stats& stats) noexcept
{
    using fvec = simd::vec<T>;
    constexpr index_t width = simd::lanes<T>, pack_chunk = conv::pack_chunk<T>;
    const index_t IC = ICN ? ICN : g.in(), OC = g.out(), OCP = round_up(OC, width);
    const index_t step = g.template s<2>() * IC; // between a tile's pixels
    const index_t x0 = t.base + (ow0 * g.template s<2>() - g.template p<2>()) * IC; // window origin: may lie in the padding
    const index_t cw = std::min(pack_chunk, OCP - oc0 / pack_chunk * pack_chunk);
    const T* wc = wp + blocked_offset<T>(g.taps() * IC, OCP, 0, oc0); // this tile's block, row 0
    const index_t last_lanes = std::min<index_t>(width, OC - oc0 - (VB - 1) * width); // of the last vector
    // The loops over pixels and vectors are unrolled explicitly (here and below): without it
    // GCC kept the border tiles' accumulators in memory (in_channels = 1: 10-11 instead of
    // 7.6-7.8 ms for Conv3d(1,32,3)'s forward on Zen 5).
    fvec acc[PB][VB];
    #pragma GCC unroll 32
    for (int p = 0; p < PB; ++p)
        #pragma GCC unroll 32
        for (int j = 0; j < VB; ++j) {
            const T* o = yrow + (ow0 + p) * OC + oc0 + j * width;
            acc[p][j] = first || p >= npix                      ? fvec(T(0))
                        : j + 1 < VB || last_lanes == width ? simd::load(o)
                                                            : simd::load_partial(o, last_lanes);
        }
    for (index_t k = k0; k < k1; ++k) {
        const T* wk = wc + t.w[k] * cw;
        const index_t xk = x0 + t.x[k];
        // The tile's pixels whose input for this tap is inside (a run: iw grows with p).
        const index_t plo = std::clamp<index_t>(t.lo[k] - ow0, 0, npix);
        const index_t phi = std::clamp<index_t>(t.hi[k] - ow0, 0, npix);
        // Pixels outside [plo, phi) read their x from a row of zeros (the padding's value):
        // the same unmasked fmas for every pixel.  Masked fmas cost a blend each without
        // AVX-512, and a branch per pixel in the channel loop more than the fmas it skips.
        // Interior tiles cost the same with these pointers as with offsets from one (the
        // pixels' stride is a run-time value either way).
        auto reduce = [&] {
            const T* xp[PB];
            const T* x1 = xn + xk + ic0;
            if (plo == 0 && phi == PB) // the common case: no select per pixel
                #pragma GCC unroll 32
                for (int p = 0; p < PB; ++p) xp[p] = x1 + p * step;
            else
                #pragma GCC unroll 32
                for (int p = 0; p < PB; ++p) xp[p] = p >= plo && p < phi ? x1 + p * step : zero_row<T>;
            auto channel = [&](index_t ic) {
                broadcast_fmas<PB, VB, false>(acc, wk + ic * cw, [&](int p) { return xp[p][ic - ic0]; });
            };
            if constexpr (ICN > 0) {
                // Not unrolled: unrolled, GCC hoisted every channel's weights (ICN x VB
                // registers besides 24 accumulators) and spilled (Conv3d(3,64,7,s2)'s forward
                // 280 -> 243 ms on Zen 5).
                #pragma GCC unroll 1
                for (index_t ic = 0; ic < ICN; ++ic) channel(ic);
            }
            else
                for (index_t ic = ic0; ic < ic1; ++ic) channel(ic);
        };
        // One body per tile: with a masked and an unmasked body GCC keeps acc in memory (a
        // load and a store per accumulator per tap: border tiles cost as much as whole ones).
        // A masked fma costs what an fma costs on AVX-512 (a blend more elsewhere).
        reduce();
    }
    if (last) {
        store_forward_tile<PB, VB>(acc, npix, OC, bias, oc0, yrow, ow0, epi, stats);
        return;
    }
    for (int p = 0; p < PB; ++p) {
        if (p >= npix) break;
        for (int j = 0; j < VB; ++j) {
            T* o = yrow + (ow0 + p) * OC + oc0 + j * width;
            if (j + 1 < VB || last_lanes == width) simd::store(o, acc[p][j]);
            else simd::store_partial(o, acc[p][j], last_lanes);
        }
    }
}

/// A forward that keeps no statistics.
struct no_stats {
    template <int PB, int VB, class V>
    [[gnu::always_inline]] void add_tile(const V (&)[PB][VB], index_t, index_t) noexcept
    {
    }
};

/// Per-channel count, mean and M2 (sum of squared deviations from the mean), in double.
/// merge_into() is Chan's formula (moments.hpp): two sets' moments combined without cancellation.
struct channel_moments {
    double *count, *mean, *m2; // OCP each (whole vectors)

    void merge_into(index_t c, simd::dvec nb, simd::dvec mb, simd::dvec m2b) noexcept
    {
        simd::dvec na = simd::dvec::load_unaligned(count + c), ma = simd::dvec::load_unaligned(mean + c),
                   m2a = simd::dvec::load_unaligned(m2 + c);
        chan_merge(na, ma, m2a, nb, mb, m2b);
        na.store_unaligned(count + c);
        ma.store_unaligned(mean + c);
        m2a.store_unaligned(m2 + c);
    }
};

/// The moments of the values one block of output rows stores, accumulated while each tile
/// is still in registers: per channel, the sums of d = x - K and d^2 around a shift K (the
/// channel's first value in the block), with no division per tile.  finish() turns them
/// into (count, mean = K + s1/n, M2 = s2 - s1^2/n); the cancellation in M2 is bounded by
/// ((mean - K)/std)^2 * 2^-52 (a value of the same channel is within a few std of its
/// mean; even 1e4 std away this stays below float precision), and blocks are then merged
/// with Chan's formula in block order.
struct block_moments {
    double *count, *shift, *s1, *s2; // OCP each

    /// Inlined into the tile: the accumulators must stay in registers (a call would take
    /// their address and spill them for the whole tile loop).
    template <int PB, int VB, class T>
    [[gnu::always_inline]] void add_tile(const simd::vec<T> (&v)[PB][VB], index_t npix, index_t oc0) noexcept
    {
        constexpr index_t width = simd::lanes<T>, D = simd::lanes<double>;
        constexpr int H = static_cast<int>(width / D); // double vectors per vector of T: 2 or 1
        const bool first = count[oc0] == 0; // per chunk: all its channels start together
        for (int j = 0; j < VB; ++j) {
            const index_t c = oc0 + j * width;
            simd::dvec w[PB][H];
            for (int p = 0; p < PB; ++p) {
                if constexpr (H == 2) {
                    const simd::dpair d = simd::widen(v[p][j]);
                    w[p][0] = d.lo;
                    w[p][H - 1] = d.hi;
                } else {
                    w[p][0] = v[p][j];
                }
            }
            if (first)
                for (int h = 0; h < H; ++h) w[0][h].store_unaligned(shift + c + h * D);
            for (int h = 0; h < H; ++h) {
                const index_t ch = c + h * D;
                const simd::dvec k = simd::dvec::load_unaligned(shift + ch);
                simd::dvec a = simd::dvec::load_unaligned(s1 + ch), b = simd::dvec::load_unaligned(s2 + ch);
                for (int p = 0; p < PB; ++p)
                    if (p < npix) {
                        const simd::dvec d = w[p][h] - k;
                        a += d;
                        b = xsimd::fma(d, d, b);
                    }
                a.store_unaligned(s1 + ch);
                b.store_unaligned(s2 + ch);
                (simd::dvec::load_unaligned(count + ch) + simd::dvec(static_cast<double>(npix)))
                    .store_unaligned(count + ch);
            }
        }
    }
    /// In place: (count, shift, s1, s2) -> (count, mean, M2, -) for channels [0, n).
    void finish(index_t n) noexcept
    {
        for (index_t c = 0; c < n; ++c) {
            if (count[c] == 0) continue;
            const double mean_d = s1[c] / count[c];
            const double m2 = s2[c] - s1[c] * mean_d;
            shift[c] += mean_d;
            s1[c] = m2 < 0 ? 0 : m2;
        }
    }
};

/// Output rows per statistics block (fixed: blocks, and so the merge order, do not depend
/// on the thread count).
inline constexpr index_t moment_rows = 8;

/// Doubles of workspace forward's moments need: count, shift, s1, s2 per block plus the result.
template <class T = float>
index_t moments_workspace(index_t rows, index_t OC) noexcept
{
    return 4 * round_up(OC, simd::lanes<T>) * ((rows + moment_rows - 1) / moment_rows + 1);
}

/// y[n][od][oh][ow][oc] = epi(bias[oc] + sum over taps and ic of x * w) (NDHWC in and out),
/// in tiles of `vectors` (1..max_vectors) output-channel vectors, the reduction of every tile
/// in blocks of about `block_rows` (tap, ic) rows (L1 blocking of the weights).  wp:
/// pack()'s (blocked) forward layout; bias: OCP floats or null.  Parallel over blocks of output rows.  With `moments`
/// (moments_workspace doubles; identity epilogue only, null otherwise), also the per-channel
/// count, mean and M2 of the stored values, returned in its first 3 * OCP doubles (count, mean,
/// M2).
template <class G, class Epi, class T>
void forward_tiles(const G& g, index_t vectors, index_t block_rows, conv_loop order, conv_split split, index_t N,
                   extents3 in, extents3 out, const T* x, const T* wp, const T* bias, T* y, Epi epi,
                   double* moments = nullptr) noexcept
{
    constexpr index_t width = simd::lanes<T>;
    const index_t IC = g.in(), OC = g.out(), OCP = round_up(OC, width);
    // Blocks of R output rows: the unit of threads and of statistics (fixed: the merge order
    // does not depend on the thread count); a block's rows share one tap table.
    const index_t rows = N * out.d * out.h, R = moment_rows, blocks = (rows + R - 1) / R;
    // One output row, the channel chunks starting in [c0, c1).
    auto run = [&](auto& stats, row_taps& taps, index_t row, index_t c0, index_t c1) {
        const index_t n = row / (out.d * out.h), od = row / out.h % out.d, oh = row % out.h;
        const T* xn = x + n * in.d * in.h * in.w * IC;
        T* yrow = y + row * out.w * OC;
        for_channel_chunks<T>(OC, vectors, [&]<int VB>(index_t oc0) {
            if (oc0 < c0 || oc0 >= c1) return;
            constexpr int PB = pixels_for<VB>, PBb = conv_narrow_tile_pixels(VB);
            // Left to right (the statistics see the pixels in order): `wide` tiles of PB pixels,
            // then tiles of PBb (row_cover).  A tile costs its width whatever its pixels read.
            const index_t wide = row_cover(out.w, PB, PBb);
            with_input_channels(g, [&]<int ICN>() {
                bool first = true;
                // The reduction in blocks of about block_rows (tap, ic) rows, each run over every
                // tile of the row (the block's weights stay in L1 across them), over the row's
                // valid taps in segments of the table's capacity.
                auto run_block = [&](index_t k0, index_t k1, index_t ic0, index_t ic1, bool last) {
                    index_t ow0 = 0;
                    for (index_t i = 0; i < wide; ++i, ow0 += PB)
                        forward_tile_taps<PB, VB, ICN>(g, xn, taps, k0, k1, ic0, ic1, first, last, ow0,
                                                       std::min<index_t>(PB, out.w - ow0), wp, bias, oc0, yrow,
                                                       epi, stats);
                    for (; ow0 < out.w; ow0 += PBb)
                        forward_tile_taps<PBb, VB, ICN>(g, xn, taps, k0, k1, ic0, ic1, first, last, ow0,
                                                        std::min<index_t>(PBb, out.w - ow0), wp, bias, oc0, yrow,
                                                        epi, stats);
                    first = false;
                };
                const index_t taps_n = g.taps();
                for (index_t t0 = 0; t0 < taps_n; t0 += row_taps::capacity) {
                    const index_t t1 = std::min(taps_n, t0 + row_taps::capacity);
                    taps.set(g, in, out, od, oh, t0, t1);
                    const bool final_segment = t1 == taps_n;
                    if (taps.n == 0) {
                        if (final_segment) run_block(0, 0, 0, 0, true); // bias and epilogue only, or the last store
                        continue;
                    }
                    // A block's channels stay within the zero row border tiles read.
                    const index_t channel_block = std::min(block_rows, max_block_channels);
                    if (ICN > 0 || IC <= channel_block) { // blocks of whole taps
                        const index_t per = std::max<index_t>(1, block_rows / IC);
                        for (index_t k0 = 0; k0 < taps.n; k0 += per) {
                            const index_t k1 = std::min(taps.n, k0 + per);
                            run_block(k0, k1, 0, IC, final_segment && k1 == taps.n);
                        }
                    } else { // blocks of channels within a tap
                        for (index_t k = 0; k < taps.n; ++k)
                            for (index_t ic0 = 0; ic0 < IC; ic0 += channel_block) {
                                const index_t ic1 = std::min(IC, ic0 + channel_block);
                                run_block(k, k + 1, ic0, ic1, final_segment && k + 1 == taps.n && ic1 == IC);
                            }
                    }
                }
            });
        });
    };
    // A block's rows for the chunks starting in [c0, c1): each row over every chunk, or each
    // chunk over every row (its weights then serve the whole block before the next chunk's are
    // read).  Each output keeps its sum, and each channel sees its rows in order: the same
    // bits either way.
    auto run_rows = [&](auto& stats, index_t b, index_t c0, index_t c1) {
        row_taps taps;
        const index_t r1 = std::min(rows, (b + 1) * R);
        if (order == conv_loop::rows_outer)
            for (index_t row = b * R; row < r1; ++row) run(stats, taps, row, c0, c1);
        else
            for_channel_chunks<T>(OC, vectors, [&]<int>(index_t oc0) {
                if (oc0 >= c0 && oc0 < c1)
                    for (index_t row = b * R; row < r1; ++row) run(stats, taps, row, oc0, oc0 + 1);
            });
    };
    // Tasks (channel group, block), group-major: one group of every chunk (split rows), or one
    // group per chunk (split channels: a thread's tasks share few chunks' weights).  A block's
    // moments are zeroed before any task, written by the tasks of its groups (disjoint
    // channels) and finished once all have run.  Statistics are instantiated for the identity
    // epilogue only (the fused block keeps the conv output z and applies BN + ReLU after).
    const bool with_stats = std::is_same_v<Epi, expr::identity_t> && moments;
    index_t groups = 1;
    if (split == conv_split::channels) {
        groups = 0;
        for_channel_chunks<T>(OC, vectors, [&]<int>(index_t) { ++groups; });
    }
    auto group_start = [&](index_t c) {
        index_t i = 0, start = 0;
        for_channel_chunks<T>(OC, vectors, [&]<int>(index_t oc0) {
            if (i++ == c) start = oc0;
        });
        return start;
    };
    auto block_stats = [&](index_t b) {
        double* m = moments + 4 * OCP * (b + 1);
        return block_moments{m, m + OCP, m + 2 * OCP, m + 3 * OCP};
    };
    if (with_stats) std::fill(moments + 4 * OCP, moments + 4 * OCP * (blocks + 1), 0.0);
    parallel::parallel_for(groups * blocks, rows * out.w * OC * IC * g.taps(), [&](index_t t) {
        const index_t b = t % blocks, c0 = groups == 1 ? 0 : group_start(t / blocks);
        const index_t c1 = groups == 1 ? OCP : c0 + 1;
        if constexpr (std::is_same_v<Epi, expr::identity_t>)
            if (moments) {
                block_moments stats = block_stats(b);
                return run_rows(stats, b, c0, c1);
            }
        no_stats none;
        run_rows(none, b, c0, c1);
    });
    if (with_stats) parallel::parallel_for(blocks, blocks * OCP, [&](index_t b) { block_stats(b).finish(OCP); });
    if (with_stats) { // the fixed merge tree: blocks in order
        std::fill(moments, moments + 3 * OCP, 0.0);
        channel_moments total{moments, moments + OCP, moments + 2 * OCP};
        for (index_t b = 0; b < blocks; ++b) {
            const double* m = moments + 4 * OCP * (b + 1);
            for (index_t c = 0; c < OCP; c += static_cast<index_t>(simd::dvec::size))
                total.merge_into(c, simd::dvec::load_unaligned(m + c), simd::dvec::load_unaligned(m + OCP + c),
                                 simd::dvec::load_unaligned(m + 2 * OCP + c));
        }
    }
}

/// The forward with schedule s (its forward tile).
template <class G, class Epi, class T>
void forward(const G& g, const conv_schedule& s, index_t N, extents3 in, extents3 out, const T* x,
             const T* wp, const T* bias, T* y, Epi epi, double* moments = nullptr) noexcept
{
    forward_tiles(g, s.tile_vectors, s.forward_block_rows, s.forward_loop, s.forward_split, N, in, out, x, wp, bias,
                  y, epi, moments);
}

// --- grad input ----------------------------------------------------------------------
// With stride 1, dx is a forward convolution of dy: input channels OC, output channels IC,
// the taps flipped, padding dil*(k-1) - p (so the output has the input's extents); it runs
// the forward micro-kernel (no scatter, no zero-fill, each dx element one fma chain).  Other
// strides (or a padding past the dilated kernel, where that padding would be negative) gather:
// input pixels grouped by their residue mod the stride (the sub-pixel decomposition) read the
// same taps from consecutive output pixels.

/// Padding of grad input's forward convolution, per dimension dil*(k-1) - p (dynamic where
/// any of the three is).
constexpr size3 transposed_padding(size3 k, size3 p, size3 dil) noexcept
{
    auto one = [&](int i) {
        if (k[i] == dynamic || p[i] == dynamic || dil[i] == dynamic) return dynamic;
        const index_t v = dil[i] * (k[i] - 1) - p[i];
        return v < 0 ? dynamic : v; // negative: grad input gathers instead
    };
    return {one(0), one(1), one(2)};
}

/// The spec of grad input's forward convolution (what S fixes stays fixed; stride 1).
constexpr conv_spec transposed_spec(conv_spec S) noexcept
{
    return {.in = S.out, .out = S.in, .kernel = S.kernel, .stride = 1,
            .padding = transposed_padding(S.kernel, S.padding, S.dilation), .dilation = S.dilation};
}

/// Whether grad input runs as a forward convolution of dy (stride 1, padding within the
/// dilated kernel, more than narrow_channels input channels).
template <class G>
constexpr bool grad_input_as_forward(const G& g) noexcept
{
    return g.in() > narrow_channels && g.template s<0>() == 1 && g.template s<1>() == 1 && g.template s<2>() == 1 &&
           g.template p<0>() <= g.template dil<0>() * (g.template k<0>() - 1) &&
           g.template p<1>() <= g.template dil<1>() * (g.template k<1>() - 1) &&
           g.template p<2>() <= g.template dil<2>() * (g.template k<2>() - 1);
}
/// The weight layout grad input reads: forward's for the narrow kernel (few input channels),
/// flipped and transposed for the forward formulation, transposed for the gather.
template <class G>
constexpr packing grad_input_packing(const G& g) noexcept
{
    return g.in() <= narrow_channels        ? packing::forward_rows
           : grad_input_as_forward(g)       ? packing::flipped_transposed
                                            : packing::transposed;
}


/// An input row (id, ih) and a residue rw of its pixels mod the stride along w: the pixels
/// iw = rw + sw * j a gather tile holds.
struct gather_row {
    index_t id, ih, rw;
};

/// The taps that reach a gather_row's pixels, in (kd, kh, kw) order, as a flat table (the
/// gather's row_taps): per entry k, its tap t[k], the offset y[k] (relative to `base`) in dy of
/// the output pixel ow = q(kw) of the output row it reads, so that pixel j reads output pixel
/// j + q(kw) (consecutive), and the pixels j whose output pixel lies inside the row: [lo[k],
/// hi[k]).  Tiles run their whole reduction as one loop over the table (nested tap loops with
/// run-time bounds kept a runtime-shaped tile's accumulators in memory).  The table depends on
/// the row only through the residues of id + pd and ih + ph mod the stride and which kd and kh
/// reach an output row: set() refills it only when those change.  Holds the taps [t0, t0 +
/// capacity); larger kernels are walked in segments.
struct gather_taps {
    static constexpr index_t capacity = row_taps::capacity;
    index_t n = 0, base = 0;
    index_t t[capacity], y[capacity], lo[capacity], hi[capacity];
    index_t key[8] = {-1, -1, -1, -1, -1, -1, -1, -1};

    template <class G>
    void set(const G& g, extents3 out, gather_row r, index_t t0) noexcept
    {
        const index_t OC = g.out(), KD = g.template k<0>(), KH = g.template k<1>(), KW = g.template k<2>();
        const index_t sd = g.template s<0>(), sh = g.template s<1>(), sw = g.template s<2>();
        const index_t ad = r.id + g.template p<0>(), ah = r.ih + g.template p<1>(); // >= 0
        // Tap k of a dimension reads output row a / s - e(k), e(k) = (k * dil - a % s) / s, when
        // the division is exact; e grows with k, so the k reaching a row inside [0, out) form
        // one run of those: [first, last).
        auto reach = [](index_t a, index_t s, index_t dil, index_t extent, index_t K) {
            std::array<index_t, 2> run{0, 0};
            bool any = false;
            for (index_t k = 0; k < K; ++k) {
                const index_t e = k * dil - a % s;
                if (e % s != 0 || a / s - e / s < 0 || a / s - e / s >= extent) continue;
                if (!any) run[0] = k;
                run[1] = k + 1;
                any = true;
            }
            return run;
        };
        const auto vd = reach(ad, sd, g.template dil<0>(), out.d, KD);
        const auto vh = reach(ah, sh, g.template dil<1>(), out.h, KH);
        const index_t k[8] = {ad % sd, ah % sh, vd[0], vd[1], vh[0], vh[1], r.rw, t0};
        base = (ad / sd * out.h + ah / sh) * out.w * OC;
        if (std::equal(k, k + 8, key)) return;
        std::copy(k, k + 8, key);
        n = 0;
        // Nested loops over the valid kd and kh only (a refill per row and residue when the
        // stride exceeds 1: divisions per tap of all taps cost ~8 % of a 7x7x7 layer).
        const index_t t1 = std::min(g.taps(), t0 + capacity);
        for (index_t kd = vd[0]; kd < vd[1]; ++kd) {
            const index_t ed = kd * g.template dil<0>() - ad % sd;
            if (ed % sd != 0) continue;
            for (index_t kh = vh[0]; kh < vh[1]; ++kh) {
                const index_t eh = kh * g.template dil<1>() - ah % sh;
                if (eh % sh != 0) continue;
                const index_t row = (ed / sd * out.h + eh / sh) * out.w;
                for (index_t kw = 0; kw < KW; ++kw) {
                    const index_t tap = (kd * KH + kh) * KW + kw;
                    const index_t nw = r.rw + g.template p<2>() - kw * g.template dil<2>();
                    if (tap < t0 || tap >= t1 || nw % sw != 0) continue; // (exact division below, negative nw included)
                    const index_t q = nw / sw;
                    t[n] = tap;
                    y[n] = (q - row) * OC;
                    lo[n] = -q;
                    hi[n] = out.w - q;
                    ++n;
                }
            }
        }
    }
};

/// The gather tiles' walk over the taps reaching pixels j0 + p (p < PB) of row r: f(tap, yk,
/// yo, on) per table entry, with yk the offset in dy of pixel j0's output pixel (pixel p reads
/// yk + p * OC); when Checked, on[p] says whether pixel p < npix reads an output pixel inside
/// the image and yo[p] its offset (0, a valid address, when not): the tiles mask those fmas (a
/// branch per pixel would cost more than the fmas it skips).  The table holds row r's taps
/// (set by the caller) unless the kernel has more than its capacity: then it is refilled per
/// segment.
template <int PB, bool Checked, class T, class G, class F>
[[gnu::always_inline]] inline void for_table_taps(const G& g, gather_taps& taps, extents3 out, gather_row r,
                                                  index_t j0, index_t npix, F&& f) noexcept
{
    const index_t taps_n = g.taps(), OC = g.out();
    for (index_t t0 = 0; t0 < taps_n; t0 += gather_taps::capacity) {
        if (taps_n > gather_taps::capacity) taps.set(g, out, r, t0);
        for (index_t k = 0; k < taps.n; ++k) {
            const index_t yk = taps.base + taps.y[k] + j0 * OC;
            [[maybe_unused]] index_t yo[PB];
            [[maybe_unused]] simd::mask<T> on[PB];
            if constexpr (Checked)
                #pragma GCC unroll 32
                for (int p = 0; p < PB; ++p) {
                    const bool in = p < npix && j0 + p >= taps.lo[k] && j0 + p < taps.hi[k];
                    on[p] = simd::mask<T>(in);
                    yo[p] = in ? yk + p * OC : 0;
                }
            f(taps.t[k], yk, yo, on);
        }
    }
}

/// One tile of grad input as a gather: input pixels iw = rw + sw * (j0 + p) along w, p < PB
/// (p < npix and only output pixels inside the image when Checked), input channels
/// [ic0, ic0 + VB * width).  Every pixel of the tile has the same residue rw mod sw, so the
/// same taps reach it, from consecutive output pixels: ow = j0 + p + q(kw).  Each dx element
/// sums its terms in (kd, kh, kw, oc) order whatever the tile.
template <int PB, int VB, bool Checked, class G, class T>
inline void grad_input_tile(const G& g, const T* dyn, gather_taps& taps, extents3 out, gather_row r, index_t j0,
                            index_t npix, const T* wt, index_t ic0, T* dxrow) noexcept
{
    using fvec = simd::vec<T>;
    constexpr index_t width = simd::lanes<T>;
    const index_t IC = g.in(), OC = g.out(), ICP = round_up(IC, width), sw = g.template s<2>();
    fvec acc[PB][VB];
    #pragma GCC unroll 32
    for (int p = 0; p < PB; ++p)
        #pragma GCC unroll 32
        for (int j = 0; j < VB; ++j) acc[p][j] = fvec(T(0));
    for_table_taps<PB, Checked, T>(g, taps, out, r, j0, npix, [&](index_t tap, index_t yk, const index_t(&yo)[PB],
                                                                   const simd::mask<T>(&on)[PB]) {
        const T* wk = wt + tap * OC * ICP + ic0;
        for (index_t oc = 0; oc < OC; ++oc)
            broadcast_fmas<PB, VB, Checked>(
                acc, wk + oc * ICP,
                [&](int p) {
                    if constexpr (Checked) return dyn[yo[p] + oc];
                    else return dyn[yk + p * OC + oc];
                },
                on);
    });
    for (int p = 0; p < PB; ++p) {
        if (Checked && p >= npix) break;
        T* o = dxrow + (r.rw + sw * (j0 + p)) * IC + ic0;
        for (int j = 0; j < VB; ++j) {
            const index_t lanes = std::min<index_t>(width, IC - ic0 - j * width);
            if (lanes == width) simd::store(o + j * width, acc[p][j]);
            else simd::store_partial(o + j * width, acc[p][j], lanes);
        }
    }
}

/// Walks input row (id, ih)'s pixels of each residue rw mod the stride along w: residue(rw)
/// first, then f.template operator()<P, Checked>(rw, j0, npix) for tiles of pixels iw = rw + sw
/// * (j0 + p), p < npix, left to right.  Tiles whose output pixels all lie inside the image hold
/// P = PB pixels, unchecked; the others (near the padding, and the remainder) are checked and
/// narrow (P = min(PB, 4)), so that their cost follows the pixels they hold.
template <int PB, class G, class R, class F>
void for_gather_tiles(const G& g, extents3 in, extents3 out, R&& residue, F&& f)
{
    constexpr int PBb = std::min(PB, 4);
    const index_t sw = g.template s<2>(), pw = g.template p<2>();
    const index_t span = (g.template k<2>() - 1) * g.template dil<2>();
    for (index_t rw = 0; rw < std::min(sw, in.w); ++rw) {
        residue(rw);
        const index_t count = (in.w - rw + sw - 1) / sw; // input pixels with this residue
        // ow = j + q with q in [floor((rw + pw - span) / sw), floor((rw + pw) / sw)]: tiles
        // with j in [j_lo, j_hi) need no bounds checks.
        const index_t lo_num = rw + pw - span;
        const index_t q_min = lo_num >= 0 ? lo_num / sw : -((-lo_num + sw - 1) / sw), q_max = (rw + pw) / sw;
        const index_t j_lo = std::min(count, std::max<index_t>(0, -q_min));
        const index_t j_end = j_lo + std::max<index_t>(0, std::min(count, out.w - q_max) - j_lo) / PB * PB;
        auto checked = [&](index_t from, index_t to) {
            for (index_t j = from; j < to; j += PBb)
                f.template operator()<PBb, true>(rw, j, std::min<index_t>(PBb, to - j));
        };
        checked(0, j_lo);
        for (index_t j = j_lo; j < j_end; j += PB) f.template operator()<PB, false>(rw, j, index_t{PB});
        checked(j_end, count);
    }
}

/// Input rows per grad-input task (they share a tap table).
inline constexpr index_t gather_rows = 8;

/// The grad-input tasks: (group, block of gather_rows input rows (n, id, ih)) in group-major
/// order, each (row, group) pair's part of dx written once, so the bits do not depend on the
/// thread count.  f(taps, group, id, ih, dy of image n, dx row), with a tap table per task.
template <class G, class T, class F>
void for_input_rows(const G& g, index_t N, extents3 in, extents3 out, const T* dy, T* dx, index_t groups, F&& f)
{
    const index_t IC = g.in(), OC = g.out(), rows = N * in.d * in.h, R = gather_rows, blocks = (rows + R - 1) / R;
    const index_t cost = rows * in.w * IC * OC * g.taps() / (g.template s<0>() * g.template s<1>() * g.template s<2>());
    parallel::parallel_for(groups * blocks, cost, [&](index_t task) {
        const index_t group = task / blocks, b = task % blocks;
        gather_taps taps;
        for (index_t row = b * R; row < std::min(rows, (b + 1) * R); ++row) {
            const index_t n = row / (in.d * in.h), id = row / in.h % in.d, ih = row % in.h;
            f(taps, group, id, ih, dy + n * out.d * out.h * out.w * OC, dx + row * in.w * IC);
        }
    });
}

/// dx = the sum, over the taps and output pixels that read each input pixel, of dy * w, as a
/// gather (NDHWC; any stride, padding, dilation), in tiles of `per_chunk` input-channel
/// vectors; threads split blocks of input rows (each with every chunk) or (chunk, block)
/// tasks, chunk-major.  wt: pack(.., packing::transposed)'s layout.
template <class G, class T>
void grad_input_gather(const G& g, index_t per_chunk, conv_split split, index_t N, extents3 in, extents3 out,
                       const T* dy, const T* wt, T* dx) noexcept
{
    index_t groups = 1;
    if (split == conv_split::channels) {
        groups = 0;
        for_channel_chunks<T>(g.in(), per_chunk, [&]<int>(index_t) { ++groups; });
    }
    for_input_rows(g, N, in, out, dy, dx, groups,
                   [&](gather_taps& taps, index_t group, index_t id, index_t ih, const T* dyn, T* dxrow) {
                       index_t chunk = 0;
                       for_channel_chunks<T>(g.in(), per_chunk, [&]<int VB>(index_t ic0) {
                           if (groups > 1 && chunk++ != group) return;
                           constexpr int PB = pixels_for<VB>;
                           for_gather_tiles<PB>(
                               g, in, out, [&](index_t rw) { taps.set(g, out, {id, ih, rw}, 0); },
                               [&]<int P, bool Checked>(index_t rw, index_t j0, index_t npix) {
                                   grad_input_tile<P, VB, Checked>(g, dyn, taps, out, {id, ih, rw}, j0, npix, wt,
                                                                   ic0, dxrow);
                               });
                       });
                   });
}

// Few input channels (1-4: a network's first layer) leave most lanes of an input-channel vector
// idle.  The narrow grad input vectorizes over output channels instead: per (pixel, ic), a
// vector of partial sums over oc lanes, reduced across lanes once per dx element.

/// Pixels per narrow tile for IC input channels: PB * IC accumulators.
template <int IC>
inline constexpr int narrow_pixels = std::min(12, acc_registers / IC);

/// One narrow tile (pixels as in grad_input_tile, all IC channels): acc[p][ic] += dy[ow][oc
/// vector] * w[tap][ic][oc vector] over taps and oc vectors; wp: pack()'s forward_rows layout (its
/// padding lanes are zero; dy's tail vector is read partially).  Each dx element: its lanes'
/// sums in (kd, kh, kw, oc vector) order, then simd::halving_sum.
template <int IC, int PB, bool Checked, int F, class G, class T>
inline void grad_input_narrow_tile(const G& g, const T* dyn, gather_taps& taps, extents3 out, gather_row r,
                                   index_t j0, index_t npix, const T* wp, T* dxrow) noexcept
{
    using fvec = simd::vec<T>;
    constexpr index_t width = simd::lanes<T>;
    const index_t OC = g.out(), OCP = round_up(OC, width), full = F > 0 ? F : OC / width, tail = OC - full * width;
    const index_t sw = g.template s<2>();
    fvec acc[PB][IC];
    #pragma GCC unroll 32
    for (int p = 0; p < PB; ++p)
        #pragma GCC unroll 32
        for (int i = 0; i < IC; ++i) acc[p][i] = fvec(T(0));
    for_table_taps<PB, Checked, T>(g, taps, out, r, j0, npix, [&](index_t tap, index_t yk, const index_t(&yo)[PB],
                                                                   const simd::mask<T>(&on)[PB]) {
        const T* wk = wp + tap * IC * OCP;
        [[maybe_unused]] const T* pix[(PB + 2) / 3];
        if constexpr (!Checked)
            for (int b = 0; b < (PB + 2) / 3; ++b) pix[b] = dyn + yk + 3 * b * OC;
        auto step = [&](index_t c, auto load) {
            fvec w[IC];
            #pragma GCC unroll 32
            for (int i = 0; i < IC; ++i) w[i] = simd::load(wk + i * OCP + c);
            #pragma GCC unroll 32
            for (int p = 0; p < PB; ++p) {
                if constexpr (Checked) {
                    const fvec dv = load(dyn + yo[p] + c);
                    #pragma GCC unroll 32
                    for (int i = 0; i < IC; ++i) acc[p][i] = simd::fma_where(on[p], dv, w[i], acc[p][i]);
                } else {
                    // Pixel p from base p / 3 at p % 3 * OC: four bases and OC address every pixel
                    // (scaled indexing) when OC is a run-time value; 12 separate offsets spilled.
                    const fvec dv = load(pix[p / 3] + p % 3 * OC + c);
                    #pragma GCC unroll 32
                    for (int i = 0; i < IC; ++i) acc[p][i] = simd::fma(dv, w[i], acc[p][i]);
                }
            }
        };
        auto whole = [](const T* a) { return simd::load(a); };
        // A compile-time count of whole vectors is unrolled by 2, a run-time one by 4: measured on
        // Conv3d(3,64,7,s2)'s grad input (Zen 5), full unrolling spilled registers (1.5x
        // slower), no unrolling left loop overhead (1.4x), and with a run-time count GCC kept
        // the accumulators in memory around the loop whatever the unrolling (1.4x).
        if constexpr (F > 0) {
            #pragma GCC unroll 2
            for (index_t v = 0; v < F; ++v) step(v * width, whole);
        } else {
            #pragma GCC unroll 4
            for (index_t v = 0; v < full; ++v) step(v * width, whole);
        }
        if (tail) step(full * width, [&](const T* a) { return simd::load_partial(a, tail); });
    });
    for (int p = 0; p < PB; ++p) {
        if (Checked && p >= npix) break;
        T* o = dxrow + (r.rw + sw * (j0 + p)) * IC;
        for (int i = 0; i < IC; ++i) o[i] = simd::halving_sum(acc[p][i]);
    }
}

/// Grad input for in_channels <= narrow_channels (any stride), wp in pack()'s forward_rows layout.
template <class G, class T>
void grad_input_narrow(const G& g, index_t N, extents3 in, extents3 out, const T* dy, const T* wp, T* dx) noexcept
{
    constexpr index_t width = simd::lanes<T>;
    // F: output-channel vectors (whole ones) as a compile-time constant: the spec's, or for a
    // run-time OC its count when 1-4 (the common first layers), else 0 (counted at run time).
    auto run = [&]<int IC, int F>() {
        constexpr int PB = narrow_pixels<IC>;
        for_input_rows(g, N, in, out, dy, dx, 1,
                       [&](gather_taps& taps, index_t, index_t id, index_t ih, const T* dyn, T* dxrow) {
                           for_gather_tiles<PB>(
                               g, in, out, [&](index_t rw) { taps.set(g, out, {id, ih, rw}, 0); },
                               [&]<int P, bool Checked>(index_t rw, index_t j0, index_t npix) {
                                   grad_input_narrow_tile<IC, P, Checked, F>(g, dyn, taps, out, {id, ih, rw}, j0,
                                                                             npix, wp, dxrow);
                               });
                       });
    };
    with_input_channels(g, [&]<int IC>() {
        if constexpr (IC == 0) return;
        else if constexpr (G::spec.out != dynamic) run.template operator()<IC, static_cast<int>(G::spec.out / width)>();
        else
            [&]<int... V>(std::integer_sequence<int, V...>) {
                const index_t full = g.out() / width;
                if (!((full == V + 1 ? (run.template operator()<IC, V + 1>(), true) : false) || ...))
                    run.template operator()<IC, 0>();
            }(std::make_integer_sequence<int, 4>{});
    });
}

/// dx (NDHWC, overwritten) for dy, in tiles of s.grad_input_vectors input-channel vectors; wt
/// packed as grad_input_packing(g) says.  Only the formulation(s) the spec leaves possible are
/// instantiated.
template <class G, class T>
void grad_input(const G& g, const conv_schedule& s, index_t N, extents3 in, extents3 out, const T* dy, const T* wt,
                T* dx) noexcept
{
    constexpr conv_spec S = G::spec;
    constexpr bool stride_fixed = S.stride.d != dynamic && S.stride.h != dynamic && S.stride.w != dynamic;
    constexpr bool unit_stride = S.stride == size3(1);
    constexpr bool padding_fits = transposed_spec(S).padding.d != dynamic &&
                                  transposed_spec(S).padding.h != dynamic && transposed_spec(S).padding.w != dynamic;
    auto as_forward = [&] {
        // g's run-time members hold every value, fixed by the spec or not
        const conv_geometry<transposed_spec(S)> gt{g.out(), g.in(), g.k_, 1, transposed_padding(g.k_, g.p_, g.dil_),
                                                   g.dil_};
        forward_tiles(gt, s.grad_input_vectors, s.forward_block_rows, s.forward_loop, s.forward_split, N, out, in, dy,
                      wt, static_cast<const T*>(nullptr), dx,
                      expr::identity_t{});
    };
    auto gather = [&] { grad_input_gather(g, s.grad_input_vectors, s.forward_split, N, in, out, dy, wt, dx); };
    if constexpr (S.in != dynamic && S.in <= narrow_channels) grad_input_narrow(g, N, in, out, dy, wt, dx);
    else {
        if constexpr (S.in == dynamic)
            if (g.in() <= narrow_channels) return grad_input_narrow(g, N, in, out, dy, wt, dx);
        if constexpr (unit_stride && padding_fits) as_forward();
        else if constexpr (stride_fixed && !unit_stride) gather();
        else if (grad_input_as_forward(g)) as_forward();
        else gather();
    }
}

// --- grad weight: a GEMM over output pixels --------------------------------------------
// gw[(tap, ic)][oc] = sum over output pixels P of x[P's input pixel for tap][ic] * dy[P][oc]:
// a GEMM whose rows are the (tap, ic) pairs and whose reduction runs over every output pixel.
// x is read from a copy with its zero padding made explicit (pad_input), so every row reads
// without bounds checks, and a tile of MB rows x VB output-channel vectors keeps its
// accumulators in registers over a cache block of output rows.  A tile's rows are consecutive
// channels of one tap when in_channels fill a tile (one input address per pixel); otherwise
// they mix taps, so small in_channels (1-4) still fill the tile.

/// (tap, ic) rows a grad-weight tile of VB output-channel vectors holds registers for.
template <int VB>
inline constexpr int inputs_for = conv_gw_max_rows(VB);

/// Extents of x with its padding made explicit.
template <class G>
extents3 padded_extents(const G& g, extents3 in) noexcept
{
    return {in.d + 2 * g.template p<0>(), in.h + 2 * g.template p<1>(), in.w + 2 * g.template p<2>()};
}

/// Floats past the padded input that grad_weight's tiles may read (rows of a tile past its
/// last are read, never stored); pad_input zeroes them.
inline constexpr index_t pad_slack = 2 * acc_registers;

/// Floats pad_input writes (slack included).
template <class G>
index_t padded_size(const G& g, index_t N, extents3 in) noexcept
{
    const extents3 e = padded_extents(g, in);
    return N * e.d * e.h * e.w * g.in() + pad_slack;
}

/// xp = x with zeros around it (NDHWC, padded_extents); parallel over (image, padded depth).
template <class G, class T>
void pad_input(const G& g, index_t N, extents3 in, const T* x, T* xp) noexcept
{
    constexpr T zero(0);
    const index_t IC = g.in(), pd = g.template p<0>(), ph = g.template p<1>(), pw = g.template p<2>();
    const extents3 e = padded_extents(g, in);
    const index_t plane = e.h * e.w * IC;
    std::fill(xp + N * e.d * plane, xp + N * e.d * plane + pad_slack, zero);
    parallel::parallel_for(N * e.d, N * e.d * plane, [&](index_t nd) {
        const index_t n = nd / e.d, d = nd % e.d - pd;
        T* out = xp + nd * plane;
        if (d < 0 || d >= in.d) {
            std::fill(out, out + plane, zero);
            return;
        }
        for (index_t h = 0; h < e.h; ++h) {
            T* row = out + h * e.w * IC;
            const index_t ih = h - ph;
            if (ih < 0 || ih >= in.h) {
                std::fill(row, row + e.w * IC, zero);
                continue;
            }
            std::fill(row, row + pw * IC, zero);
            const T* src = x + ((n * in.d + d) * in.h + ih) * in.w * IC;
            std::copy(src, src + in.w * IC, row + pw * IC);
            std::fill(row + (pw + in.w) * IC, row + e.w * IC, zero);
        }
    });
}

/// One grad-weight tile: rows [m0, m0 + nm) x VB output-channel vectors of gw (o: its first
/// element), summed over output rows [r0, r1).  dyc: those channels' dY of the block's pixels
/// in order, `stride` floats apart (pack_dy_block).  off[m]: row m's input element from the
/// output pixel's window origin in xp (PerTap: rows are consecutive channels of one tap,
/// off[m] = off[0] + m; rows past nm read, never stored).  Not inlined: one copy per
/// instantiation, its accumulators in registers.
template <int VB, bool PerTap, class G, class T>
[[gnu::noinline]] void grad_weight_tile(const G& g, extents3 e, extents3 out, const T* xp, const T* dyc,
                                        index_t stride, const index_t* off, index_t nm, index_t r0, index_t r1,
                                        T* o) noexcept
{
    using fvec = simd::vec<T>;
    constexpr index_t width = simd::lanes<T>;
    constexpr int MB = inputs_for<VB>;
    const index_t IC = g.in(), OCP = round_up(g.out(), width);
    const index_t first = off[0];
    fvec acc[MB][VB]; // rows past nm start from row 0's (any value: never stored)
    #pragma GCC unroll 32
    for (int m = 0; m < MB; ++m)
        #pragma GCC unroll 32
        for (int j = 0; j < VB; ++j) acc[m][j] = simd::load(o + (m < nm ? m : 0) * OCP + j * width);
    // (n, od, oh) of the row, decoded once and stepped: divisions per row cost as much as a
    // 16-pixel row's FMAs.
    index_t n = r0 / (out.d * out.h), od = r0 / out.h % out.d, oh = r0 % out.h;
    for (index_t row = r0; row < r1; ++row) {
        if (row > r0 && ++oh == out.h && (oh = 0, ++od == out.d)) od = 0, ++n;
        const T* base = xp + ((n * e.d + od * g.template s<0>()) * e.h + oh * g.template s<1>()) * e.w * IC;
        const T* dyrow = dyc + (row - r0) * out.w * stride;
        for (index_t ow = 0; ow < out.w; ++ow) {
            const T* bp = base + ow * g.template s<2>() * IC;
            fvec d[VB];
            #pragma GCC unroll 32
            for (int j = 0; j < VB; ++j) d[j] = simd::load(dyrow + ow * stride + j * width);
            #pragma GCC unroll 32
            for (int m = 0; m < MB; ++m) {
                const fvec b(PerTap ? bp[first + m] : bp[off[m]]);
                #pragma GCC unroll 32
                for (int j = 0; j < VB; ++j) acc[m][j] = simd::fma(b, d[j], acc[m][j]);
            }
        }
    }
    #pragma GCC unroll 32
    for (int m = 0; m < MB; ++m)
        if (m < nm)
            #pragma GCC unroll 32
            for (int j = 0; j < VB; ++j) simd::store(o + m * OCP + j * width, acc[m][j]);
}

/// grad_weight's blocking of dY: output channels in chunks of `chunk` floats (the tile's
/// vectors), output rows in blocks of `rows` (s.gw_block_pixels at least).
struct gw_blocking {
    index_t chunk, chunks, rows;
    /// Floats of one block of dY packed chunk-major (pack_dy_block).
    index_t block_floats(index_t w) const noexcept { return chunks * rows * w * chunk; }
};
template <class T, class G>
gw_blocking gw_blocking_of(const G& g, const conv_schedule& s, extents3 out) noexcept
{
    constexpr index_t width = simd::lanes<T>;
    const index_t OC = g.out();
    // Vectors per tile: the schedule's, or all of OC's if fewer.
    const index_t chunk = std::min<index_t>(s.gw_vectors, (OC + width - 1) / width) * width;
    return {chunk, (OC + chunk - 1) / chunk, std::max<index_t>(1, (s.gw_block_pixels + out.w - 1) / out.w)};
}

/// Floats of grad_weight's workspace for its calls with up to `threads` threads: each thread
/// packs the dY of its block there.
template <class T, class G>
index_t grad_weight_workspace(const G& g, const conv_schedule& s, extents3 out, int threads) noexcept
{
    return std::max(threads, 1) * gw_blocking_of<T>(g, s, out).block_floats(out.w);
}

/// dY's output rows [r0, r1) (NDHWC, OC channels) into p chunk-major: chunk c's channels of
/// pixel i at p[(c * pixels + i) * chunk], the last chunk's lanes past OC zero.  A tile then
/// reads its chunk's dY consecutively: in NDHWC each pixel's chunk lies OC floats after the
/// last, and at OC = 128 (512 bytes) a block's 128+ pixels of one chunk map to 8 of L1's 64
/// sets, which hold 64 lines: every tile missed L1 on every pixel (25 % of Conv3d(64,128,3)'s
/// grad weight on Zen 3).
template <class T>
void pack_dy_block(const T* dy, index_t OC, const gw_blocking& b, index_t w, index_t r0, index_t r1, T* p) noexcept
{
    const index_t pixels = (r1 - r0) * w;
    for (index_t i = 0; i < pixels; ++i) {
        const T* src = dy + (r0 * w + i) * OC;
        for (index_t c = 0; c < b.chunks; ++c) {
            const index_t c0 = c * b.chunk, c1 = std::min(OC, c0 + b.chunk);
            T* dst = p + (c * pixels + i) * b.chunk;
            std::copy(src + c0, src + c1, dst);
            std::fill(dst + (c1 - c0), dst + b.chunk, T(0));
        }
    }
}

/// gw[tap][ic][OCP] += the GEMM above (NDHWC dy; xp from pad_input; gw in pack()'s forward_rows
/// layout, accumulated into), in tiles of inputs_for<V> (tap, ic) rows x V = s.gw_vectors
/// output-channel vectors.  Cache blocking: each thread takes a fixed range of tiles and runs all of them
/// over one block of output rows (s.gw_block_pixels at least) before the next block, so the
/// block's dy and x are read from cache by every tile; a tile's accumulators go through gw
/// between blocks (exactly: float stores and loads), so each gw element sums the pixels in the
/// same order whatever the split or the schedule.  work: work_floats >=
/// grad_weight_workspace(g, s, out, 1) floats (each thread's packed block of dy; the threads
/// are as many as it has room for).
template <class G, class T>
void grad_weight(const G& g, const conv_schedule& s, index_t N, extents3 in, extents3 out, const T* xp, const T* dy,
                 T* gw, T* work, index_t work_floats) noexcept
{
    constexpr index_t width = simd::lanes<T>;
    const index_t IC = g.in(), OC = g.out(), OCP = round_up(OC, width), M = g.taps() * IC;
    const index_t KH = g.template k<1>(), KW = g.template k<2>();
    const extents3 e = padded_extents(g, in);
    // Rows per tile: as many as the tile's vectors leave registers for (a narrower tail chunk
    // has registers for at least as many).
    const gw_blocking b = gw_blocking_of<T>(g, s, out);
    const index_t chunk = b.chunk, oc_chunks = b.chunks;
    const index_t MB_max = conv_gw_max_rows(static_cast<int>(chunk / width));
    // Row blocks: within one tap when its channels fill whole tiles but for at most 1/16 of
    // them (a tile's input elements are then consecutive: one address per pixel, no offset
    // per row), else across taps (no tile runs short; small in_channels still fill a tile).
    const index_t per_tap_blocks = (IC + MB_max - 1) / MB_max;
    const bool per_tap = IC >= MB_max && 16 * (per_tap_blocks * MB_max - IC) <= IC;
    const index_t m_blocks = per_tap ? g.taps() * per_tap_blocks : (M + MB_max - 1) / MB_max;
    const index_t tiles = m_blocks * oc_chunks;
    const index_t rows = N * out.d * out.h, rb = b.rows;
    // Offsets in xp of rows [m0, m0 + nm) 's input elements from the output pixel's window
    // origin, into off[0, MB) (rows past nm: row m0's).  Decoded once per tile and block, then
    // stepped: a division per row per block cost ~10 % of Conv3d(64,128,3)'s grad weight.
    auto row_offsets = [&](index_t m0, index_t nm, index_t* off, int MB) {
        index_t ic = m0 % IC, t = m0 / IC, kw = t % KW, kh = t / KW % KH, kd = t / (KH * KW);
        for (int m = 0; m < MB; ++m) {
            off[m] = m > 0 && m >= nm ? off[0]
                             : ((kd * g.template dil<0>() * e.h + kh * g.template dil<1>()) * e.w +
                                kw * g.template dil<2>()) * IC + ic;
            if (++ic == IC && (ic = 0, ++kw == KW) && (kw = 0, ++kh == KH)) kh = 0, ++kd;
        }
    };
    // One tile over output rows [r0, r1).
    // Tiles in the order the threads split them into contiguous ranges: (tap, ic)-row blocks
    // major (each thread every output-channel chunk of its rows), or channel chunks major (each
    // thread as few chunks as possible: it reads only those chunks' dY).
    const bool chunks_major = s.gw_split == conv_split::channels;
    auto tile = [&](index_t task, index_t r0, index_t r1, const T* packed) {
        const index_t mb = chunks_major ? task % m_blocks : task / oc_chunks;
        const index_t oc0 = (chunks_major ? task / m_blocks : task % oc_chunks) * chunk;
        const index_t m0 = per_tap ? mb / per_tap_blocks * IC + mb % per_tap_blocks * MB_max : mb * MB_max;
        const index_t nm = per_tap ? std::min(MB_max, IC - mb % per_tap_blocks * MB_max) : std::min(MB_max, M - m0);
        const index_t vectors = (std::min(OC, oc0 + chunk) - oc0 + width - 1) / width;
        with_vectors(vectors, [&]<int VB>() {
            constexpr int MB = inputs_for<VB>; // >= MB_max: VB <= vectors
            index_t off[MB];
            row_offsets(m0, nm, off, MB);
            T* o = gw + m0 * OCP + oc0;
            const T* dyc = packed + oc0 / chunk * (r1 - r0) * out.w * chunk;
            if (per_tap) grad_weight_tile<VB, true>(g, e, out, xp, dyc, chunk, off, nm, r0, r1, o);
            else grad_weight_tile<VB, false>(g, e, out, xp, dyc, chunk, off, nm, r0, r1, o);
        });
    };
    // Each part packs its block's dY into its slice of the workspace (as many parts as the
    // workspace has slices for, if the thread count grew since it was sized).
    const index_t per_part = b.block_floats(out.w);
    const index_t parts = std::max<index_t>(1, std::min({tiles, index_t{get_num_threads()}, work_floats / per_part}));
    parallel::parallel_for(parts, N * out.d * out.h * out.w * OC * M, [&](index_t part) {
        const index_t t0 = tiles * part / parts, t1 = tiles * (part + 1) / parts;
        T* packed = work + part * per_part;
        for (index_t r0 = 0; r0 < rows; r0 += rb) {
            const index_t r1 = std::min(rows, r0 + rb);
            pack_dy_block(dy, OC, b, out.w, r0, r1, packed);
            for (index_t task = t0; task < t1; ++task) tile(task, r0, r1, packed);
        }
    });
}

} // namespace volfuse::kernels::conv
