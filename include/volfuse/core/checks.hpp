// Argument checks every public call runs before it reads or writes anything: sizes that are
// non-negative and whose products fit (computed with overflow checks: signed overflow is
// undefined behaviour, so a product is never formed unchecked), data that is not null, and
// outputs that are disjoint from everything else of the call (or exactly an input, where a
// call runs in place).  One place, so that every module answers the same way.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "config.hpp"
#include "error.hpp"
#include "format.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS::detail {

/// r = a * b (a + b); false when it overflows index_t.
constexpr bool mul_ok(index_t a, index_t b, index_t& r) noexcept { return !__builtin_mul_overflow(a, b, &r); }
constexpr bool add_ok(index_t a, index_t b, index_t& r) noexcept { return !__builtin_add_overflow(a, b, &r); }

/// ATen's checks on the sizes of a tensor to be created (at::empty): each size >= 0
/// ("Trying to create tensor with negative dimension"), the bytes representable ("Storage size
/// calculation overflowed").  Returns the element count.
constexpr index_t checked_numel(std::span<const index_t> sizes, std::size_t elem_bytes = sizeof(float))
{
    auto list = [&] {
        std::string s = "[";
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            if (i) s += ", ";
            s += std::to_string(sizes[i]);
        }
        return s + "]";
    };
    for (index_t v : sizes)
        if (v < 0) throw error("Trying to create tensor with negative dimension " + std::to_string(v) + ": " + list());
    index_t n = 1, bytes = 0;
    bool ok = true;
    for (index_t v : sizes) ok = ok && mul_ok(n, v, n);
    if (!ok || !mul_ok(n, static_cast<index_t>(elem_bytes), bytes))
        throw error("Storage size calculation overflowed with sizes=" + list());
    return n;
}

/// One tensor argument of a call, checked: its sizes (as checked_numel), the elements of
/// memory it spans (blocked layouts pad C to whole blocks), its data not null when it has
/// elements.  Built before anything else of the call runs.
struct operand {
    const void* data;
    index_t numel;
    index_t storage; // elements of memory
    std::array<index_t, 5> sizes;
    std::string_view name;
    std::size_t elem_bytes = sizeof(float);

    bool overlaps(const operand& o) const noexcept
    {
        if (storage == 0 || o.storage == 0) return false;
        const auto a = reinterpret_cast<std::uintptr_t>(data), b = reinterpret_cast<std::uintptr_t>(o.data);
        const auto na = static_cast<std::uintptr_t>(storage) * elem_bytes,
                   nb = static_cast<std::uintptr_t>(o.storage) * o.elem_bytes;
        return a < b + nb && b < a + na;
    }
};

/// The operand for view V named `name` (the caller's word: "input", "grad_output", ...).
template <class V>
operand operand_of(const V& v, std::string_view name)
{
    const auto sz = v.sizes();
    constexpr std::size_t elem = sizeof(typename V::value_type);
    const index_t n = checked_numel(sz, elem);
    index_t storage = n;
    if constexpr (V::layout_type::name == std::string_view("nCdhw16c")) {
        // N * ceil(C/16)*16 * D*H*W elements, again without an unchecked product.
        constexpr index_t B = V::layout_type::block;
        const std::array<index_t, 5> padded{sz[0], (sz[1] + B - 1) / B * B, sz[2], sz[3], sz[4]};
        storage = checked_numel(padded, elem);
    }
    if (n > 0 && v.data() == nullptr) throw error(std::string(name) + " data pointer is null");
    return {v.data(), n, storage, sz, name, elem};
}

/// Output `out` must not share memory with `other`, except being exactly it (same data and
/// sizes) where the call allows in place.
inline void check_disjoint(const operand& out, const operand& other, bool same_ok = false)
{
    if (same_ok && out.data == other.data && out.sizes == other.sizes) return;
    if (out.overlaps(other))
        throw error(std::string(out.name) + (same_ok ? " partially overlaps " : " overlaps ") + std::string(other.name) +
                    (same_ok ? " (it must be the same memory or disjoint)" : ""));
}

/// Sizes must be `want`: "<name> has shape [..] but <who> expects [..] for input [..]".
inline void check_sizes(const operand& a, const std::array<index_t, 5>& want, std::string_view who,
                        const std::array<index_t, 5>& input)
{
    if (a.sizes != want)
        throw error(std::string(a.name) + " has shape " + sizes_str(a.sizes) + " but " + std::string(who) +
                    " expects " + sizes_str(want) + " for input " + sizes_str(input));
}

} // namespace volfuse::detail
