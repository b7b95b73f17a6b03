// A schedule is a value: how the kernels of a channel form run (vector width, unroll,
// channel block, threads).  It is derived at compile time from the layout and from
// which extents are static (and, for threads, from set_num_threads); describe()
// prints the loop nest an expression compiles to.
#pragma once

#include "../core/config.hpp"

#include <string>
#include <string_view>

#include "../kernels/channel_loops.hpp"
#include "../parallel/threads.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS {

struct schedule {
    std::string_view arch;     // xsimd architecture the kernels were compiled for
    index_t vector_width;      // floats per vector
    int unroll;                // independent vectors in flight per step
    index_t channel_block;     // channels processed together (1: channel-major)
    index_t pixel_block;       // pixels per parallel block (channel-minor), 0 otherwise
    int threads;               // threads the parallel loops use
    bool static_channels;      // C known at compile time
    bool channels_unrolled;    // the channel loop unrolled at compile time (registers)
};

/// The schedule the kernels use for a channel form.
template <class Form>
schedule schedule_for(const Form& f)
{
    constexpr bool minor = Form::channel_minor;
    constexpr bool static_c = static_value_v<decltype(Form::channels)> != dynamic;
    const index_t C = value_of(f.channels);
    if constexpr (Form::blocked)
        return {simd::arch::name(), simd::width, static_cast<int>(Form::block / simd::width), Form::block, 0,
                get_num_threads(),  static_c,    true};
    else
        return {simd::arch::name(),
                simd::width,
                minor ? 1 : 2,
                minor ? C : 1,
                minor ? kernels::reduce_block : 0,
                get_num_threads(),
                static_c,
                kernels::unrolled_channels<Form>};
}

} // namespace volfuse
