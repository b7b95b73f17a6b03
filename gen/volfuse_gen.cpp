// volfuse_gen: an architecture description in, a C++ source and header out, with explicit
// instantiations of volfuse's kernels specialized for exactly those layers and their
// registry entries (include/volfuse/registry/registry.hpp), so code that only knows shapes
// at run time still runs specialized kernels.
//
//   volfuse_gen ARCH OUT.cpp OUT.hpp [--namespace NAME] [--tune [--tune-batch N]]
//
// --tune measures candidate conv schedules for each conv layer on this machine (gen/tune.hpp)
// and writes the fastest into the registration; without it, layers run this CPU's default
// schedule.  A conv layer's `input=D,H,W` gives the spatial extents it is measured on
// (default 16,32,32, enlarged to the dilated kernel), with --tune-batch volumes (default 1).
//
// ARCH: one layer per line, `#` starts a comment:
//   conv_bn_relu conv1 in=3 out=64 kernel=7 stride=2 padding=3 layout=ndhwc
//   conv         proj  in=64 out=64 kernel=1
//   batch_norm   bn0   channels=64 layout=ncdhw
//   bn_relu      bn1   channels=64
// kernel, stride, padding, dilation, input: one integer or d,h,w (kernel=1,3,3).  Defaults:
// stride=1, padding=0, dilation=1, layout=ncdhw.  A bad description is reported as
// FILE:LINE:COLUMN: error: ... and nothing is written.
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <utility>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "tune.hpp"

namespace {

struct triple {
    long d = 0, h = 0, w = 0;
    std::string cpp() const
    {
        std::string s = "{"; // appended piece by piece: GCC 12's false -Wrestrict (PR 105329)
        s += std::to_string(d);
        s += ", ";
        s += std::to_string(h);
        s += ", ";
        s += std::to_string(w);
        s += "}";
        return s;
    }
};

struct layer {
    std::string op, name, layout = "ncdhw";
    long in = 0, out = 0; // batch_norm / bn_relu: channels
    triple kernel{1, 1, 1}, stride{1, 1, 1}, padding{0, 0, 0}, dilation{1, 1, 1};
    triple input{16, 32, 32}; // --tune's measurement extents
    int line = 0;
    std::optional<volfuse_gen::tune_result> tuned;
    bool is_conv() const { return op == "conv" || op == "conv_bn_relu"; }
};

struct parse_error {
    int line, column;
    std::string message;
};

bool is_identifier(const std::string& s)
{
    if (s.empty() || !(std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_')) return false;
    for (char c : s)
        if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_')) return false;
    return true;
}

/// A word of a line and the column (1-based) it starts at.
struct word {
    std::string text;
    int column;
};

std::vector<word> split(const std::string& line)
{
    std::vector<word> out;
    std::size_t i = 0;
    const std::size_t end = line.find('#') == std::string::npos ? line.size() : line.find('#');
    while (i < end) {
        while (i < end && std::isspace(static_cast<unsigned char>(line[i]))) ++i;
        const std::size_t start = i;
        while (i < end && !std::isspace(static_cast<unsigned char>(line[i]))) ++i;
        if (i > start) out.push_back({line.substr(start, i - start), static_cast<int>(start) + 1});
    }
    return out;
}

/// A positive (or, with allow_zero, non-negative) decimal integer.
std::optional<long> integer(const std::string& s, bool allow_zero)
{
    if (s.empty() || s.size() > 9) return std::nullopt;
    for (char c : s)
        if (!std::isdigit(static_cast<unsigned char>(c))) return std::nullopt;
    const long v = std::stol(s);
    if (v == 0 && !allow_zero) return std::nullopt;
    return v;
}

std::optional<triple> parse_triple(const std::string& s, bool allow_zero)
{
    std::vector<std::string> parts;
    std::stringstream ss(s);
    for (std::string p; std::getline(ss, p, ',');) parts.push_back(p);
    if (!s.empty() && s.back() == ',') return std::nullopt;
    if (parts.size() == 1) {
        const auto v = integer(parts[0], allow_zero);
        if (!v) return std::nullopt;
        return triple{*v, *v, *v};
    }
    if (parts.size() != 3) return std::nullopt;
    triple t;
    long* dst[3] = {&t.d, &t.h, &t.w};
    for (int i = 0; i < 3; ++i) {
        const auto v = integer(parts[static_cast<std::size_t>(i)], allow_zero);
        if (!v) return std::nullopt;
        *dst[i] = *v;
    }
    return t;
}

layer parse_line(const std::vector<word>& words, int line_no)
{
    auto fail = [&](int col, const std::string& msg) { throw parse_error{line_no, col, msg}; };
    layer l;
    l.line = line_no;
    l.op = words[0].text;
    const bool conv = l.op == "conv" || l.op == "conv_bn_relu";
    if (!conv && l.op != "batch_norm" && l.op != "bn_relu")
        fail(words[0].column, "unknown op '" + l.op + "': expected conv, conv_bn_relu, batch_norm or bn_relu");
    if (words.size() < 2) fail(words[0].column + static_cast<int>(l.op.size()), "expected a layer name after '" + l.op + "'");
    l.name = words[1].text;
    if (!is_identifier(l.name) || l.name.find('=') != std::string::npos)
        fail(words[1].column, "layer name '" + l.name + "' is not an identifier (letters, digits, _)");
    const std::set<std::string> allowed = conv ? std::set<std::string>{"in", "out", "kernel", "stride", "padding",
                                                                      "dilation", "layout", "input"}
                                               : std::set<std::string>{"channels", "layout"};
    std::map<std::string, int> seen;
    for (std::size_t i = 2; i < words.size(); ++i) {
        const auto& w = words[i];
        const auto eq = w.text.find('=');
        if (eq == std::string::npos || eq == 0) fail(w.column, "expected key=value, got '" + w.text + "'");
        const std::string k = w.text.substr(0, eq), v = w.text.substr(eq + 1);
        const int vcol = w.column + static_cast<int>(eq) + 1;
        if (!allowed.count(k)) {
            std::string list;
            for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
            fail(w.column, "unknown key '" + k + "' for " + l.op + ": expected one of " + list);
        }
        if (seen.count(k)) fail(w.column, "duplicate key '" + k + "' (first at column " + std::to_string(seen[k]) + ")");
        seen[k] = w.column;
        if (k == "layout") {
            if (v != "ncdhw" && v != "ndhwc") fail(vcol, "layout must be ncdhw or ndhwc, got '" + v + "'");
            l.layout = v;
        } else if (k == "in" || k == "out" || k == "channels") {
            const auto n = integer(v, false);
            if (!n) fail(vcol, k + " must be a positive integer, got '" + v + "'");
            (k == "out" ? l.out : l.in) = *n;
            if (k == "channels") l.out = *n;
        } else {
            const auto t = parse_triple(v, k == "padding");
            if (!t)
                fail(vcol, k + " must be " + (k == "padding" ? "a non-negative" : "a positive") +
                               " integer or three of them as d,h,w, got '" + v + "'");
            (k == "kernel" ? l.kernel : k == "stride" ? l.stride : k == "padding" ? l.padding
                                      : k == "input"  ? l.input : l.dilation) = *t;
        }
    }
    const int after = words.back().column + static_cast<int>(words.back().text.size());
    for (const char* req : conv ? std::vector<const char*>{"in", "out", "kernel"} : std::vector<const char*>{"channels"})
        if (!seen.count(req)) fail(after, std::string("missing key '") + req + "' for " + l.op);
    return l;
}

std::vector<layer> parse(std::istream& in)
{
    std::vector<layer> layers;
    std::map<std::string, int> names;
    std::string line;
    for (int n = 1; std::getline(in, line); ++n) {
        const auto words = split(line);
        if (words.empty()) continue;
        layer l = parse_line(words, n);
        if (names.count(l.name))
            throw parse_error{n, words[1].column,
                              "duplicate layer name '" + l.name + "' (first on line " + std::to_string(names[l.name]) + ")"};
        names[l.name] = n;
        layers.push_back(l);
    }
    if (layers.empty()) throw parse_error{1, 1, "no layers: expected lines such as 'conv_bn_relu conv1 in=3 out=64 kernel=3'"};
    return layers;
}

std::string spec_of(const layer& l)
{
    return "volfuse::conv_spec{.in = " + std::to_string(l.in) + ", .out = " + std::to_string(l.out) +
           ", .kernel = " + l.kernel.cpp() + ", .stride = " + l.stride.cpp() + ", .padding = " + l.padding.cpp() +
           ", .dilation = " + l.dilation.cpp() + "}";
}

std::string base_name(const std::string& path)
{
    const auto slash = path.find_last_of('/');
    return slash == std::string::npos ? path : path.substr(slash + 1);
}

/// The batch-norm kernels a layer needs: (channels, layout) — the fused block normalizes its
/// channels-last conv output.
std::pair<long, std::string> bn_of(const layer& l) { return {l.out, l.op == "conv_bn_relu" ? "ndhwc" : l.layout}; }

/// Explicit instantiations for every distinct kernel set the layers use.  Spelled with the
/// spec's value, not the layer's constant: layers of equal geometry (repeated blocks, one layer
/// in both layouts) are one specialization, and must be instantiated once.
std::vector<std::string> instantiations(const std::vector<layer>& layers)
{
    std::vector<std::string> out;
    std::set<std::string> seen;
    for (const auto& l : layers) {
        std::vector<std::string> mine;
        if (l.is_conv())
            mine.push_back("template volfuse::registry::conv_kernels volfuse::registry::conv_kernels_for<" + spec_of(l) +
                           ">() noexcept;");
        if (l.op != "conv") {
            const auto [c, layout] = bn_of(l);
            mine.push_back("template volfuse::registry::bn_kernels<volfuse::" + layout + "_t> "
                           "volfuse::registry::bn_kernels_for<" + std::to_string(c) + ", volfuse::" + layout +
                           "_t>() noexcept;");
        }
        for (auto& m : mine)
            if (seen.insert(m).second) out.push_back(m);
    }
    return out;
}

void write_header(std::ostream& o, const std::vector<layer>& layers, const std::string& ns, const std::string& src)
{
    o << "// Generated by volfuse_gen from " << src << ": do not edit.\n"
      << "// The layers' specialized module types, and the registration of their kernels.\n"
      << "#pragma once\n\n#include <volfuse/volfuse.hpp>\n\nnamespace " << ns << " {\n\n";
    for (const auto& l : layers) {
        o << "// " << src << ":" << l.line << "\n";
        if (l.is_conv()) {
            o << "inline constexpr volfuse::conv_spec " << l.name << "_spec = " << spec_of(l) << ";\n";
            // A block's type fixes its BatchNorm3d's channels too (specialized BN kernels).
            o << "using " << l.name << "_t = volfuse::" << (l.op == "conv" ? "Conv3d<" + l.name + "_spec>"
                                                                            : "ConvBnReLU3d<" + l.name + "_spec, " +
                                                                                  std::to_string(l.out) + ">")
              << ";\n";
        } else {
            o << "using " << l.name << "_t = volfuse::BatchNorm3d<" << l.out << ">;\n";
        }
    }
    o << "\n/// Adds these layers' kernels to volfuse::registry::global().  The generated source also\n"
      << "/// does it during static initialization; calling it again is harmless.\n"
      << "void register_kernels();\n\n} // namespace " << ns << "\n\n";
    o << "// Instantiated once, in the generated source.\n";
    for (const auto& d : instantiations(layers)) o << "extern " << d << "\n";
}

void write_source(std::ostream& o, const std::vector<layer>& layers, const std::string& ns, const std::string& header,
                  const std::string& src)
{
    o << "// Generated by volfuse_gen from " << src << ": do not edit.\n"
      << "#include \"" << base_name(header) << "\"\n\n";
    for (const auto& d : instantiations(layers)) o << d << "\n";
    std::set<long> channels;
    for (const auto& l : layers)
        if (!l.is_conv() && channels.insert(l.out).second) o << "template class volfuse::BatchNorm3d<" << l.out << ">;\n";
    o << "\nnamespace " << ns << " {\n\nvoid register_kernels()\n{\n"
      << "    using volfuse::registry::op;\n    auto& r = volfuse::registry::global();\n";
    for (const auto& l : layers) {
        o << "    {\n        volfuse::registry::entry e;\n        e.origin = \"" << src << ":" << l.line << " (" << l.name
          << ")\";\n";
        if (l.is_conv()) o << "        e.conv = volfuse::registry::conv_kernels_for<" << l.name << "_spec>();\n";
        if (l.tuned) {
            const auto& t = *l.tuned;
            o << "        // volfuse_gen --tune: " << t.summary << "\n"
              << "        e.schedule = volfuse::conv_schedule{.tile_vectors = " << t.tile_vectors
              << ", .forward_block_rows = " << t.forward_block_rows
              << ", .forward_loop = volfuse::conv_loop::" << t.forward_loop
              << ", .forward_split = volfuse::conv_split::" << t.forward_split
              << ", .grad_input_vectors = " << t.grad_input_vectors << ", .gw_vectors = " << t.gw_vectors
              << ", .gw_block_pixels = " << t.gw_block_pixels << ", .gw_split = volfuse::conv_split::" << t.gw_split
              << ", .origin = \"tuned by volfuse_gen --tune on "
              << t.tuned_for << " for " << src << ":" << l.line << "\", .tuned_for = \"" << t.tuned_for << "\"};\n";
        }
        if (l.op != "conv") {
            const auto [c, layout] = bn_of(l);
            o << "        e.bn_" << layout << " = volfuse::registry::bn_kernels_for<" << c << ", volfuse::" << layout
              << "_t>();\n";
        }
        o << "        r.add({op::" << l.op << ", " << l.in << ", " << l.out << ", " << l.kernel.cpp() << ", "
          << l.stride.cpp() << ", " << l.padding.cpp() << ", " << l.dilation.cpp() << ", \"" << l.layout
          << "\"}, std::move(e));\n    }\n";
    }
    o << "}\n\nnamespace {\nconst bool registered = (register_kernels(), true);\n}\n\n} // namespace " << ns << "\n";
}

} // namespace

/// Why `ns` cannot name the generated namespace (the generated header would not compile, or
/// would collide with a name every TU that includes it sees), or empty.
std::string namespace_problem(const std::string& ns)
{
    if (!is_identifier(ns)) return "is not an identifier (letters, digits, _; not starting with a digit)";
    static const std::set<std::string> keywords = {
        "alignas", "alignof", "and", "and_eq", "asm", "auto", "bitand", "bitor", "bool", "break", "case", "catch",
        "char", "char8_t", "char16_t", "char32_t", "class", "compl", "concept", "const", "consteval", "constexpr",
        "constinit", "const_cast", "continue", "co_await", "co_return", "co_yield", "decltype", "default", "delete",
        "do", "double", "dynamic_cast", "else", "enum", "explicit", "export", "extern", "false", "float", "for",
        "friend", "goto", "if", "inline", "int", "long", "mutable", "namespace", "new", "noexcept", "not", "not_eq",
        "nullptr", "operator", "or", "or_eq", "private", "protected", "public", "register", "reinterpret_cast",
        "requires", "return", "short", "signed", "sizeof", "static", "static_assert", "static_cast", "struct",
        "switch", "template", "this", "thread_local", "throw", "true", "try", "typedef", "typeid", "typename",
        "union", "unsigned", "using", "virtual", "void", "volatile", "wchar_t", "while", "xor", "xor_eq"};
    if (keywords.count(ns)) return "is a C++ keyword";
    if (ns[0] == '_' || ns.find("__") != std::string::npos)
        return "is reserved to the implementation (a leading underscore or a double underscore)";
    static const std::set<std::string> taken = {"std", "volfuse", "xsimd", "boost", "posix", "omp"};
    if (taken.count(ns)) return "is the name of a namespace the generated code uses or the standard reserves";
    // Functions and types the C library and POSIX declare in the global namespace, which the
    // generated header sees through the standard headers (<unistd.h> comes in with libstdc++'s
    // threads and OpenMP): a namespace of the same name does not compile.
    static const std::set<std::string> c_and_posix = {
        "abort", "abs", "access", "acos", "alarm", "asin", "atan", "atan2", "atexit", "atof", "atoi", "atol", "bsearch",
        "calloc", "ceil", "chdir", "chmod", "chown", "clock", "close", "cos", "cosh", "creat", "ctime", "difftime",
        "div", "dup", "dup2", "dup3", "environ", "errno", "execl", "execle", "execlp", "execv", "execve", "execvp",
        "exit", "exp", "fabs", "fchdir", "fchmod", "fchown", "fclose", "fcntl", "fdopen", "feof", "ferror", "fflush",
        "fgetc", "fgets", "fileno", "floor", "fmod", "fopen", "fork", "fprintf", "fputc", "fputs", "fread", "free",
        "freopen", "frexp", "fscanf", "fseek", "fstat", "fsync", "ftell", "ftruncate", "fwrite", "getc", "getchar",
        "getcwd", "getenv", "getpid", "getppid", "gets", "getuid", "gmtime", "index", "isatty", "kill", "labs",
        "ldexp", "ldiv", "link", "localtime", "log", "log10", "longjmp", "lseek", "lstat", "malloc", "memchr",
        "memcmp", "memcpy", "memmove", "memset", "mkdir", "mktime", "modf", "nice", "open", "pause", "perror",
        "pipe", "pow", "printf", "putc", "putchar", "puts", "qsort", "raise", "rand", "read", "readlink", "realloc",
        "remove", "rename", "rewind", "rmdir", "scanf", "select", "setbuf", "setjmp", "setvbuf", "signal", "sin",
        "sinh", "sleep", "sprintf", "sqrt", "srand", "sscanf", "stat", "strcat", "strchr", "strcmp", "strcpy",
        "strerror", "strftime", "strlen", "strncat", "strncmp", "strncpy", "strstr", "strtod", "strtok", "strtol",
        "strtoul", "symlink", "sync", "sysconf", "system", "tan", "tanh", "time", "times", "tmpfile", "tolower",
        "toupper", "truncate", "ttyname", "umask", "ungetc", "unlink", "usleep", "utime", "vfork", "wait",
        "waitpid", "write", "clock_t", "div_t", "FILE", "fpos_t", "jmp_buf", "ldiv_t", "off_t", "pid_t", "size_t",
        "ssize_t", "time_t", "tm", "uid_t", "gid_t", "mode_t", "timespec", "timeval", "sigaction", "random",
        "srandom", "optarg", "optind", "opterr", "optopt", "getopt", "basename", "dirname"};
    if (c_and_posix.count(ns))
        return "is a name the C library or POSIX declares in the global namespace (::" + ns +
               "): the generated header would not compile";
    return "";
}

const char* const usage = "usage: volfuse_gen ARCH OUT.cpp OUT.hpp [--namespace NAME] [--tune [--tune-batch N]]\n";

int main(int argc, char** argv)
{
    std::vector<std::string> args;
    std::string ns = "volfuse_generated";
    bool tune = false;
    long tune_batch = 1;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&](const char* what) -> std::string {
            if (i + 1 >= argc) {
                std::cerr << "volfuse_gen: error: " << a << " needs " << what << "\n" << usage;
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--help" || a == "-h") {
            std::cout << usage;
            return 0;
        } else if (a == "--namespace") {
            ns = value("a C++ namespace name");
            if (const std::string why = namespace_problem(ns); !why.empty()) {
                std::cerr << "volfuse_gen: error: --namespace '" << ns << "' " << why << "\n" << usage;
                return 2;
            }
        } else if (a == "--tune") {
            tune = true;
        } else if (a == "--tune-batch") {
            const std::string v = value("a positive integer");
            const auto n = integer(v, false);
            if (!n) {
                std::cerr << "volfuse_gen: error: --tune-batch must be a positive integer, got '" << v << "'\n" << usage;
                return 2;
            }
            tune_batch = *n;
        } else if (a.size() > 1 && a[0] == '-') {
            std::cerr << "volfuse_gen: error: unknown option '" << a << "'\n" << usage;
            return 2;
        } else {
            args.push_back(a);
        }
    }
    if (args.size() != 3) {
        std::cerr << "volfuse_gen: error: expected ARCH OUT.cpp OUT.hpp, got " << args.size() << " file argument"
                  << (args.size() == 1 ? "" : "s") << "\n" << usage;
        return 2;
    }
    const std::string& arch = args[0];
    std::ifstream in(arch);
    if (!in) {
        std::cerr << arch << ": error: cannot read the file\n";
        return 1;
    }
    std::vector<layer> layers;
    try {
        layers = parse(in);
    } catch (const parse_error& e) {
        std::cerr << arch << ":" << e.line << ":" << e.column << ": error: " << e.message << "\n";
        return 1;
    }
    if (tune) { // each distinct conv geometry and input measured once
        std::map<std::string, volfuse_gen::tune_result> done;
        std::cerr << "volfuse_gen --tune: " << base_name(arch) << "\n";
        for (auto& l : layers) {
            if (!l.is_conv()) continue;
            volfuse_gen::tune_layer t{l.name, l.in, l.out, {l.kernel.d, l.kernel.h, l.kernel.w},
                                      {l.stride.d, l.stride.h, l.stride.w}, {l.padding.d, l.padding.h, l.padding.w},
                                      {l.dilation.d, l.dilation.h, l.dilation.w}, tune_batch,
                                      {l.input.d, l.input.h, l.input.w}};
            for (int i = 0; i < 3; ++i) // at least the dilated kernel, so the layer has an output
                t.extent[i] = std::max(t.extent[i], t.dilation[i] * (t.kernel[i] - 1) + 1 - 2 * t.padding[i]);
            const std::string key = spec_of(l) + l.input.cpp();
            if (!done.count(key)) done.emplace(key, volfuse_gen::tune(t, std::cerr));
            l.tuned = done.at(key);
        }
    }
    // Everything is known good: only now write (each file whole, then renamed into place).
    std::ostringstream hpp, cpp;
    write_header(hpp, layers, ns, base_name(arch));
    write_source(cpp, layers, ns, args[2], base_name(arch));
    for (const auto& [path, text] : {std::pair{args[2], hpp.str()}, std::pair{args[1], cpp.str()}}) {
        const std::string tmp = path + ".tmp";
        std::ofstream out(tmp);
        out << text;
        out.close();
        if (!out || std::rename(tmp.c_str(), path.c_str()) != 0) {
            std::cerr << path << ": error: cannot write the file\n";
            return 1;
        }
    }
    return 0;
}
