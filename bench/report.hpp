// The part of the benchmarks' summary tables they share: Google Benchmark's console output
// as usual, plus every run's time in ms under its name without the option suffixes
// ("/min_warmup_time:0.2/real_time"), for a table printed in Finalize().
#pragma once

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

namespace report {

/// The benchmark programs' own flags, taken off the command line before Google Benchmark
/// sees it: `--threads=N` (threads for the kernels and the rooflines of programs that do not
/// sweep thread counts themselves; 1 when absent), `--smoke` (one iteration per row and no
/// warm-up: CI's proof that every row still runs, within CI's time, not a measurement) and
/// `--shape=N,C,D,H,W` (programs that take it: the user's shapes instead of the seed's).
struct flags {
    int threads = 1;
    bool smoke = false;
    std::vector<std::array<long, 5>> shapes; // --shape=N,C,D,H,W (repeatable): the user's own
};

inline flags& options()
{
    static flags f;
    return f;
}

inline const flags& take_flags(int& argc, char** argv, bool accepts_shape = false)
{
    auto drop = [&](int i) {
        for (int j = i; j + 1 < argc; ++j) argv[j] = argv[j + 1];
        --argc;
    };
    for (int i = 1; i < argc;)
        if (std::strncmp(argv[i], "--threads=", 10) == 0) {
            options().threads = std::atoi(argv[i] + 10);
            drop(i);
        } else if (std::strcmp(argv[i], "--smoke") == 0) {
            options().smoke = true;
            drop(i);
        } else if (std::strncmp(argv[i], "--shape=", 8) == 0) {
            if (!accepts_shape) {
                std::fprintf(stderr, "%s: --shape is for bench/run batchnorm (this benchmark runs fixed layers)\n", argv[0]);
                std::exit(2);
            }
            std::array<long, 5> s{};
            char end = 0;
            const int got = std::sscanf(argv[i] + 8, "%ld,%ld,%ld,%ld,%ld%c", &s[0], &s[1], &s[2], &s[3], &s[4], &end);
            if (got != 5 || std::any_of(s.begin(), s.end(), [](long v) { return v <= 0; })) {
                std::fprintf(stderr, "%s: --shape takes five positive sizes N,C,D,H,W (got '%s')\n", argv[0], argv[i] + 8);
                std::exit(2);
            }
            options().shapes.push_back(s);
            drop(i);
        } else {
            ++i;
        }
    return options();
}

/// Registers a benchmark as all of them run: wall time (threads), and `warmup_s` seconds of
/// warm-up first (page-in, caches, peers building their kernels), `repetitions` runs of it
/// (the tables keep the fastest: on a shared VM a run is only ever slowed down), or the smoke
/// run's one iteration.  Call after take_flags.
template <class... A>
void add(const std::string& name, double warmup_s, int repetitions, A&&... a)
{
    auto* b = benchmark::RegisterBenchmark(name.c_str(), std::forward<A>(a)...)->UseRealTime();
    if (options().smoke) b->Iterations(1);
    else b->MinWarmUpTime(warmup_s)->Repetitions(repetitions);
}

/// A run's name as registered.
inline std::string name_of(const benchmark::BenchmarkReporter::Run& r)
{
    std::string name = r.benchmark_name();
    if (const auto cut = name.find("/min_warmup_time"); cut != std::string::npos) name.erase(cut);
    if (const auto cut = name.find("/iterations:"); cut != std::string::npos) name.erase(cut);
    if (const auto cut = name.find("/real_time"); cut != std::string::npos) name.erase(cut);
    return name;
}

/// A run's wall time in ms.
inline double ms_of(const benchmark::BenchmarkReporter::Run& r)
{
    return r.GetAdjustedRealTime() * 1e3 / benchmark::GetTimeUnitMultiplier(r.time_unit);
}

/// Console output plus the completed runs, in order, and by name the fastest repetition (ms).
class collecting : public benchmark::ConsoleReporter {
public:
    void ReportRuns(const std::vector<Run>& runs) override
    {
        ConsoleReporter::ReportRuns(runs);
        for (const auto& r : runs)
            if (r.run_type == Run::RT_Iteration && !r.error_occurred) {
                rows_.push_back(r);
                const auto [it, first] = ms_.try_emplace(name_of(r), ms_of(r));
                if (!first) it->second = std::min(it->second, ms_of(r));
            }
    }

protected:
    std::vector<Run> rows_;
    std::map<std::string, double> ms_;
};

} // namespace report
