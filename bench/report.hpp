// The part of the benchmarks' summary tables they share: Google Benchmark's console output
// as usual, plus every run's time in ms under its name without the option suffixes
// ("/min_warmup_time:0.2/real_time"), for a table printed in Finalize().
#pragma once

#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

namespace report {

/// Removes `--threads=N` from the command line (before Google Benchmark sees it) and
/// returns N (1 when absent): the thread count for the kernels and the rooflines.
inline int take_threads_flag(int& argc, char** argv)
{
    int threads = 1;
    for (int i = 1; i < argc; ++i)
        if (std::strncmp(argv[i], "--threads=", 10) == 0) {
            threads = std::atoi(argv[i] + 10);
            for (int j = i; j + 1 < argc; ++j) argv[j] = argv[j + 1];
            --argc;
            --i;
        }
    return threads;
}

/// A run's name as registered.
inline std::string name_of(const benchmark::BenchmarkReporter::Run& r)
{
    std::string name = r.benchmark_name();
    if (const auto cut = name.find("/min_warmup_time"); cut != std::string::npos) name.erase(cut);
    if (const auto cut = name.find("/real_time"); cut != std::string::npos) name.erase(cut);
    return name;
}

/// A run's wall time in ms.
inline double ms_of(const benchmark::BenchmarkReporter::Run& r)
{
    return r.GetAdjustedRealTime() * 1e3 / benchmark::GetTimeUnitMultiplier(r.time_unit);
}

/// Console output plus the completed runs, in order and by name (ms).
class collecting : public benchmark::ConsoleReporter {
public:
    void ReportRuns(const std::vector<Run>& runs) override
    {
        ConsoleReporter::ReportRuns(runs);
        for (const auto& r : runs)
            if (r.run_type == Run::RT_Iteration && !r.error_occurred) {
                rows_.push_back(r);
                ms_[name_of(r)] = ms_of(r);
            }
    }

protected:
    std::vector<Run> rows_;
    std::map<std::string, double> ms_;
};

} // namespace report
