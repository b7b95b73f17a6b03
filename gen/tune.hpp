// volfuse_gen --tune: measures candidate conv schedules for one layer on this machine (the
// runtime-shaped kernels, compiled for this machine's vector ISA: every candidate runs the same
// instantiations, so the ranking carries over to the specialized ones) and returns the fastest.
// Kept apart from the parser so that volfuse_gen.cpp needs no volfuse header.
#pragma once

#include <iosfwd>
#include <string>

namespace volfuse_gen {

struct tune_layer {
    std::string name;
    long in, out, kernel[3], stride[3], padding[3], dilation[3];
    long batch, extent[3]; // the input the layer is measured on: [batch, in, d, h, w]
};

/// The measured winner, as the fields of volfuse::conv_schedule.
struct tune_result {
    int tile_vectors;
    long forward_block_rows;
    std::string forward_loop, forward_split; // enumerator names ("rows_outer", "channels", ...)
    int grad_input_vectors, gw_vectors;
    long gw_block_pixels;
    std::string gw_split; // enumerator name
    std::string tuned_for; // schedule_target() of this machine
    std::string summary;   // what was measured, for the generated source's comment
};

/// Measures the candidates for `l` and logs each measurement to `log`.
tune_result tune(const tune_layer& l, std::ostream& log);

} // namespace volfuse_gen
