#include "se_runtime/options.h"

#include <algorithm>
#include <cstdlib>
#include <sstream>

namespace se_runtime {

std::string usage() {
  return "usage: se_runtime generate --engine ENGINE --plugin LIB --ids 1,2,3 [--new-tokens N]\n"
         "       se_runtime bench    --engine ENGINE --plugin LIB [--dense-engine ENGINE] [--prompt-len L]\n"
         "                           [--new-tokens N] [--runs R] [--warmup W] [--json]\n"
         "options: --nvinfer PATH  libnvinfer to dlopen (default libnvinfer.so.<major>)\n";
}

bool parse_ids(std::string const& text, std::vector<int64_t>* ids) {
  ids->clear();
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (item.empty() || item.find_first_not_of("0123456789") != std::string::npos) return false;
    ids->push_back(std::strtoll(item.c_str(), nullptr, 10));
  }
  return !ids->empty();
}

namespace {
bool parse_int(char const* text, int min, int* out) {
  char* end = nullptr;
  const long v = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || v < min || v > 1 << 24) return false;
  *out = static_cast<int>(v);
  return true;
}
}  // namespace

std::optional<Options> parse_options(int argc, char const* const* argv, std::string* error) {
  Options o;
  if (argc < 2) {
    *error = "missing mode: generate or bench";
    return std::nullopt;
  }
  o.mode = argv[1];
  if (o.mode != "generate" && o.mode != "bench") {
    *error = "unknown mode '" + o.mode + "': use generate or bench";
    return std::nullopt;
  }
  for (int i = 2; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--json") {
      o.json = true;
      continue;
    }
    if (i + 1 >= argc) {
      *error = "flag " + flag + " needs a value";
      return std::nullopt;
    }
    char const* value = argv[++i];
    bool ok = true;
    if (flag == "--engine") o.engine = value;
    else if (flag == "--plugin") o.plugin = value;
    else if (flag == "--dense-engine") o.dense_engine = value;
    else if (flag == "--nvinfer") o.nvinfer = value;
    else if (flag == "--ids") ok = parse_ids(value, &o.ids);
    else if (flag == "--new-tokens") ok = parse_int(value, 1, &o.new_tokens);
    else if (flag == "--prompt-len") ok = parse_int(value, 1, &o.prompt_len);
    else if (flag == "--runs") ok = parse_int(value, 1, &o.runs);
    else if (flag == "--warmup") ok = parse_int(value, 0, &o.warmup);
    else {
      *error = "unknown flag " + flag;
      return std::nullopt;
    }
    if (!ok) {
      *error = "bad value '" + std::string(value) + "' for " + flag;
      return std::nullopt;
    }
  }
  std::string missing;
  if (o.engine.empty()) missing = "--engine is required (build one with se-export trt)";
  else if (o.plugin.empty()) missing = "--plugin is required (build/plugins/libse_trt_plugin.so)";
  else if (o.mode == "generate" && o.ids.empty()) missing = "generate needs --ids (comma-separated token ids)";
  if (missing.empty()) return o;
  *error = missing;
  return std::nullopt;
}

std::string present_name_for(std::string const& past_input) {
  const std::string prefix = "past_key_values.";
  if (past_input.rfind(prefix, 0) != 0) return "";
  return "present." + past_input.substr(prefix.size());
}

int64_t argmax(float const* values, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (values[i] > values[best]) best = i;
  return best;
}

double median(std::vector<double> samples) {
  if (samples.empty()) return 0.0;
  std::sort(samples.begin(), samples.end());
  const size_t m = samples.size() / 2;
  return samples.size() % 2 ? samples[m] : 0.5 * (samples[m - 1] + samples[m]);
}

}  // namespace se_runtime
