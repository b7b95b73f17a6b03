// How the conv kernels (kernels/conv3d.hpp) run: register tiles, grad weight's cache blocking.
// A schedule is a run-time value passed to the kernels, never what they compute: every field
// only regroups the same sums (each output element keeps its order of terms), so any schedule
// gives the same bits, and choosing one needs no new template instantiation (tile widths are
// picked among the instantiations the channel tails already need).
// Where a schedule comes from, in order: Conv3d::set_schedule; a schedule `volfuse_gen --tune`
// measured for the layer on this CPU class (registry entry); the default of this CPU's class
// (conv_schedule_defaults, picked with host_cpu()).
#pragma once

#include "../core/config.hpp"

#include <algorithm>
#include <string>

#include "../simd/vec.hpp"
#include "cpu.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

/// Register limits of this build's vector ISA: accumulators a tile may use (24 of AVX-512's 32
/// registers: the rest hold weights and a broadcast; 12 of AVX2/SSE's 16) and channel vectors
/// per tile.
inline constexpr int conv_acc_registers = simd::width >= 16 ? 24 : 12;
inline constexpr int conv_max_vectors = simd::width >= 16 ? 4 : 2;

/// Pixels per forward / grad-input tile for V channel vectors (12 at most: past that the
/// broadcasts, not the FMAs, limit a tile).
constexpr int conv_tile_pixels(int V) noexcept { return std::min(12, conv_acc_registers / V); }
/// Pixels of the narrower forward tiles that complete a row (kernels/conv3d.hpp row_cover):
/// at least 10 accumulators where V allows (two FMA pipes of 4-cycle latency need 8 chains in
/// flight; a 4 x 2 tile with 8 ran 1.55x slower per pixel than 6 x 2 on Zen 3, a 5 x 2 one
/// near the 6 x 2 rate), at least 4 pixels, at most a wide tile's.
constexpr int conv_narrow_tile_pixels(int V) noexcept
{
    return std::min(conv_tile_pixels(V), std::max(4, (10 + V - 1) / V));
}
/// (tap, ic) rows per grad-weight tile for V output-channel vectors.
constexpr int conv_gw_max_rows(int V) noexcept { return std::min(8, conv_acc_registers / V); }

/// The forward's loop order within a block of output rows (also grad input's, a forward
/// conv of dY for stride 1): every channel chunk of a row before the next row, or one chunk
/// over every row of the block before the next chunk (its weights then serve the whole
/// block).  Either way each output keeps its sum: the same bits.
enum class conv_loop { rows_outer, channels_outer };

inline const char* conv_loop_name(conv_loop l) noexcept
{
    return l == conv_loop::rows_outer ? "rows_outer" : "channels_outer";
}

/// What the threads split.  Forward and grad input (as a forward conv or a gather): blocks of
/// output (input) rows, every channel chunk of a block on one thread, or (channel chunk, block)
/// tasks in chunk-major order (with 2 threads and 2 chunks, each thread reads one chunk's
/// weights).  The narrow grad input (in_channels <= 4) has one chunk: it splits rows.
/// Grad weight: its tiles, (tap, ic)-row blocks major or output-channel chunks major.  Tasks
/// own disjoint outputs, each summing in a fixed order, and the statistics are merged in a
/// fixed block order: the same bits either way, for any thread count.
enum class conv_split { rows, channels };

inline const char* conv_split_name(conv_split s) noexcept { return s == conv_split::rows ? "rows" : "channels"; }

struct conv_schedule {
    /// Forward: output-channel vectors per register tile (1..conv_max_vectors); the tile is
    /// conv_tile_pixels(v) output pixels along w x v vectors.
    int tile_vectors = conv_max_vectors;
    /// Forward (and grad input as a forward conv of dY): (tap, ic) rows of the reduction per
    /// L1 block; a block's weights (rows x tile vectors) are reused by every tile of an output
    /// row before the next block.
    index_t forward_block_rows = 96;
    /// Forward (and grad input as a forward conv): the loop order within a block of rows.
    conv_loop forward_loop = conv_loop::rows_outer;
    /// Forward and grad input: what the threads split.
    conv_split forward_split = conv_split::rows;
    /// Grad input (a forward conv of dY for stride 1, a gather otherwise): input-channel
    /// vectors per tile.
    int grad_input_vectors = conv_max_vectors;
    /// Grad weight: output-channel vectors per tile; the tile is conv_gw_max_rows(v) (tap, ic)
    /// rows x v vectors.
    int gw_vectors = conv_max_vectors;
    /// Grad weight: output pixels per cache block (whole output rows, at least this many): a
    /// block's dY and input rows are read from cache by every tile of a thread.
    index_t gw_block_pixels = 256;
    /// Grad weight: what the threads split (contiguous ranges of tiles): `rows`, tiles ordered by
    /// (tap, ic)-row block first (each thread computes every output-channel chunk of its rows),
    /// or `channels`, by output-channel chunk first (each thread reads only its chunks' dY).
    conv_split gw_split = conv_split::rows;
    /// Why this schedule ("default for intel_avx512", "tuned by volfuse_gen --tune ...").
    std::string origin = "built-in";
    /// The CPU class and vector ISA a tuned schedule was measured on ("zen4/avx512bw"); empty
    /// for defaults (they apply anywhere).
    std::string tuned_for;

    /// The same schedule with every field inside what this build's kernels support.
    conv_schedule clamped() const
    {
        conv_schedule s = *this;
        auto clamp = [](int v, int lo, int hi) { return std::max(lo, std::min(hi, v)); };
        s.tile_vectors = clamp(tile_vectors, 1, conv_max_vectors);
        s.grad_input_vectors = clamp(grad_input_vectors, 1, conv_max_vectors);
        s.gw_vectors = clamp(gw_vectors, 1, conv_max_vectors);
        s.gw_block_pixels = std::max<index_t>(1, gw_block_pixels);
        s.forward_block_rows = std::max<index_t>(1, forward_block_rows);
        return s;
    }
    /// "forward tile 6x4 (pixels x vectors) over 96-row reduction blocks, rows_outer, threads
    /// split rows, grad input tile 6x4, grad weight tile 6x4 ((tap, ic) rows x vectors) per
    /// 256-pixel block, threads split rows".
    std::string str() const
    {
        auto tile = [](int p, int v) { return std::to_string(p) + "x" + std::to_string(v); };
        std::string s = "forward tile " + tile(conv_tile_pixels(tile_vectors), tile_vectors);
        s += " (pixels x vectors) over " + std::to_string(forward_block_rows) + "-row reduction blocks, ";
        s += conv_loop_name(forward_loop);
        s += ", threads split ";
        s += conv_split_name(forward_split);
        s += ", grad input tile " + tile(conv_tile_pixels(grad_input_vectors), grad_input_vectors);
        s += ", grad weight tile " + tile(conv_gw_max_rows(gw_vectors), gw_vectors);
        s += " ((tap, ic) rows x vectors) per " + std::to_string(gw_block_pixels) + "-pixel block, threads split ";
        s += conv_split_name(gw_split);
        return s;
    }
    /// Equal in what the kernels see (origin aside).
    bool same_loops(const conv_schedule& o) const noexcept
    {
        return tile_vectors == o.tile_vectors && forward_block_rows == o.forward_block_rows &&
               forward_loop == o.forward_loop && forward_split == o.forward_split &&
               grad_input_vectors == o.grad_input_vectors &&
               gw_vectors == o.gw_vectors && gw_block_pixels == o.gw_block_pixels && gw_split == o.gw_split;
    }
};

/// "intel_avx512/avx512bw": the key a tuned schedule is valid for (CPU class and the vector
/// ISA the kernels were compiled for).
inline std::string schedule_target(uarch u) { return std::string(uarch_name(u)) + "/" + simd::arch::name(); }

/// The defaults of a CPU class for this build's vector ISA.  Measured on this project's
/// machines where docs/conv.md says so; the others are reasoned from the cores' widths and
/// caches (and `volfuse_gen --tune` replaces them per layer):
///  - Intel AVX-512 (measured on an Emerald Rapids VM), Zen 5: two full-width FMA pipes need
///    >= 8 independent accumulators in flight; 6x4 tiles (24) amortize each broadcast over 4
///    FMAs.  Intel: forward blocks of 96 (tap, ic) rows (96 x 4 vectors = 24 KB of weights,
///    half the 48 KB L1; 32 to unblocked measured within noise there), 256-pixel grad-weight
///    blocks.  Zen 5 (measured on an EPYC family 26 model 2 VM): the forward is not blocked
///    (4096 rows hold every seed layer's whole reduction; a tile's weights stream from the 1 MB
///    L2 at 256 bytes per 24 FMAs, which the L2 sustains, while 96-row blocks cost 9-15 % on
///    the large layers in partial sums passed through y), and grad weight takes 512-pixel
///    blocks (2-7 % faster than 256; 2048 is 15 % slower).
///  - Zen 4: 512-bit ops as two halves halve the FMA rate (4 accumulators hide the latency),
///    so the same tiles only become less load-bound; 32 KB L1D: 64-row forward blocks (16 KB);
///    1 MB L2: the same grad-weight blocks.
///  - AVX2 / baseline: 16 registers: 6x2 tiles (the most that fit).  AVX2 (measured on a Zen 3
///    EPYC VM, family 25 model 1): the forward is not blocked, as on Zen 5 (unblocked ran 6-8 %
///    faster than 128-row blocks on Conv3d(64,128,3) and Conv3d(32,64,3), 1 and 2 threads: a
///    6x2 tile's weights stream from L2 at 64 bytes per 12 FMAs, the partial sums of blocks go
///    through y); 256-pixel grad-weight blocks (with dY packed per block, 0-8 % faster than
///    128).  Baseline (not measured): 32 KB L1D, 128-row forward blocks (2 vectors: 16 KB),
///    128-pixel grad-weight blocks (client cores' 256-512 KB L2).
inline conv_schedule conv_schedule_defaults(uarch u)
{
    conv_schedule s;
    s.origin = std::string("default for ") + uarch_name(u);
    switch (u) {
    case uarch::intel_avx512: break;
    case uarch::zen5:
        s.forward_block_rows = 4096;
        s.gw_block_pixels = 512;
        break;
    case uarch::zen4: s.forward_block_rows = 64; break;
    case uarch::avx2: s.forward_block_rows = 4096; break;
    case uarch::baseline:
        s.forward_block_rows = 128;
        s.gw_block_pixels = 128;
        break;
    }
    return s.clamped();
}

/// This CPU's default (detected once).
inline const conv_schedule& host_conv_schedule()
{
    static const conv_schedule s = [] {
        conv_schedule d = conv_schedule_defaults(host_cpu().arch);
        d.origin += " (detected: " + host_cpu().str() + ")";
        return d;
    }();
    return s;
}

/// The schedule a layer runs: `tuned` when it was measured on this CPU class and ISA, the
/// CPU's default otherwise; `why` says which.
inline conv_schedule pick_conv_schedule(const conv_schedule* tuned)
{
    if (tuned && tuned->tuned_for == schedule_target(host_cpu().arch)) return tuned->clamped();
    conv_schedule s = host_conv_schedule();
    if (tuned) s.origin += "; the layer's tuned schedule is for " + tuned->tuned_for + ", not this CPU";
    return s;
}

} // namespace volfuse
