// Text helpers that make messages read like PyTorch's (Python reprs of numbers and sizes).
#pragma once

#include <array>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>

#include "config.hpp"

namespace volfuse::inline VOLFUSE_ISA_NS::detail {

/// Python's repr() of a float: shortest round-trip digits, scientific notation
/// for exponents < -4 or >= 16 (`1e-05`, `0.1`, `1.0`, `1e+16`).
inline std::string python_repr(double v)
{
    if (v != v) return "nan";
    if (v == 1.0 / 0.0) return "inf";
    if (v == -1.0 / 0.0) return "-inf";
    char buf[64];
    // Shortest round-trip digits in scientific form: d.ddde[+-]x
    auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
    std::string sci(buf, r.ptr);
    const auto epos = sci.find('e');
    std::string mant = sci.substr(0, epos);
    const int exp = std::atoi(sci.c_str() + epos + 1);
    const bool neg = mant[0] == '-';
    if (neg) mant.erase(0, 1);
    std::string digits;
    for (char ch : mant)
        if (ch != '.') digits += ch;
    std::string out;
    if (exp < -4 || exp >= 16) {
        out = digits.substr(0, 1);
        if (digits.size() > 1) {
            out += '.'; // appended separately: GCC 12's false -Wrestrict (PR 105329) on "." + s
            out += digits.substr(1);
        }
        char e[16];
        std::snprintf(e, sizeof e, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
        out += e;
    } else if (exp < 0) {
        out = "0." + std::string(static_cast<std::size_t>(-exp - 1), '0') + digits;
    } else {
        const auto ip = static_cast<std::size_t>(exp) + 1;
        if (digits.size() <= ip)
            out = digits + std::string(ip - digits.size(), '0') + ".0";
        else
            out = digits.substr(0, ip) + "." + digits.substr(ip);
    }
    return neg ? "-" + out : out;
}

/// `[1, 4, 1, 1, 1]`: sizes as PyTorch prints them inside messages.
inline std::string sizes_str(std::span<const index_t> s)
{
    std::string out = "[";
    for (std::size_t i = 0; i < s.size(); ++i) {
        if (i) out += ", ";
        out += std::to_string(s[i]);
    }
    return out + "]";
}

} // namespace volfuse::detail
