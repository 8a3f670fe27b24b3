// se_runtime: greedy generation and latency benchmark of se-export TensorRT engines.
//   se_runtime generate --engine model.engine --plugin libse_trt_plugin.so --ids 1,2,3 --new-tokens 32
//   se_runtime bench --engine se.engine --dense-engine dense.engine --plugin libse_trt_plugin.so
// Exit codes: 0 ok, 2 bad usage or missing file, 3 no CUDA device / TensorRT, 1 other failures.
#include <sys/stat.h>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "se_runtime/engine_runner.h"
#include "se_runtime/options.h"
#include "se_runtime/trt_library.h"

namespace {

bool exists(std::string const& path) {
  struct stat st{};
  return stat(path.c_str(), &st) == 0;
}

struct BenchResult {
  std::string label;
  double prefill_ms = 0.0, decode_tokens_per_s = 0.0;
};

BenchResult bench(se_runtime::TrtLibrary const& trt, se_runtime::Logger& logger, std::string const& label,
                  std::string const& engine, se_runtime::Options const& o) {
  se_runtime::EngineRunner runner(trt, logger, engine, o.plugin);
  std::vector<int64_t> prompt(static_cast<size_t>(o.prompt_len));
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int64_t>((i * 7919 + 13) % runner.vocab_size());
  std::vector<double> prefill, decode;
  for (int r = 0; r < o.warmup + o.runs; ++r) {
    se_runtime::Timing t;
    runner.generate(prompt, o.new_tokens, &t);
    if (r < o.warmup) continue;
    prefill.push_back(t.prefill_ms);
    double total = 0.0;
    for (double ms : t.decode_ms) total += ms;
    if (!t.decode_ms.empty()) decode.push_back(1000.0 * static_cast<double>(t.decode_ms.size()) / total);
  }
  return {label, se_runtime::median(prefill), se_runtime::median(decode)};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
    std::printf("%s", se_runtime::usage().c_str());
    return 0;
  }
  std::string error;
  const auto options = se_runtime::parse_options(argc, argv, &error);
  if (!options) {
    std::fprintf(stderr, "se_runtime: %s\n%s", error.c_str(), se_runtime::usage().c_str());
    return 2;
  }
  const se_runtime::Options& o = *options;
  for (auto const& path : {o.engine, o.plugin, o.dense_engine}) {
    if (!path.empty() && !exists(path)) {
      std::fprintf(stderr, "se_runtime: file not found: %s\n", path.c_str());
      return 2;
    }
  }
  std::string why;
  if (!se_runtime::has_cuda_device(&why)) {
    std::fprintf(stderr, "se_runtime: no CUDA device (%s): TensorRT engines need an NVIDIA GPU\n", why.c_str());
    return 3;
  }
  try {
    std::unique_ptr<se_runtime::TrtLibrary> trt;
    try {
      trt = std::make_unique<se_runtime::TrtLibrary>(o.nvinfer);
    } catch (std::exception const& e) {
      std::fprintf(stderr, "se_runtime: %s\n", e.what());
      return 3;
    }
    se_runtime::Logger logger;
    if (o.mode == "generate") {
      se_runtime::EngineRunner runner(*trt, logger, o.engine, o.plugin);
      se_runtime::Timing t;
      const auto ids = runner.generate(o.ids, o.new_tokens, &t);
      for (size_t i = 0; i < ids.size(); ++i) std::printf("%s%lld", i ? "," : "", static_cast<long long>(ids[i]));
      std::printf("\n");
      return 0;
    }
    std::vector<BenchResult> rows = {bench(*trt, logger, "expanded", o.engine, o)};
    if (!o.dense_engine.empty()) rows.push_back(bench(*trt, logger, "dense", o.dense_engine, o));
    if (o.json) {
      std::printf("{\"prompt_len\": %d, \"new_tokens\": %d, \"runs\": %d, \"results\": [", o.prompt_len, o.new_tokens,
                  o.runs);
      for (size_t i = 0; i < rows.size(); ++i)
        std::printf("%s{\"engine\": \"%s\", \"prefill_ms\": %.4f, \"decode_tokens_per_s\": %.3f}", i ? ", " : "",
                    rows[i].label.c_str(), rows[i].prefill_ms, rows[i].decode_tokens_per_s);
      std::printf("]}\n");
    } else {
      std::printf("%-10s %14s %18s\n", "engine", "prefill ms", "decode tokens/s");
      for (auto const& r : rows)
        std::printf("%-10s %14.3f %18.2f\n", r.label.c_str(), r.prefill_ms, r.decode_tokens_per_s);
      if (rows.size() == 2 && rows[1].decode_tokens_per_s > 0)
        std::printf("decode speed-up expanded/dense: %.2fx; prefill time ratio: %.2fx\n",
                    rows[0].decode_tokens_per_s / rows[1].decode_tokens_per_s, rows[0].prefill_ms / rows[1].prefill_ms);
    }
    return 0;
  } catch (std::exception const& e) {
    std::fprintf(stderr, "se_runtime: %s\n", e.what());
    return 1;
  }
}
