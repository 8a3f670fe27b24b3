// CPU tests of se_runtime's pure parts: option parsing and its one-line errors, token id lists,
// KV-cache naming (past_key_values.N.* <- present.N.*), greedy argmax, median.
#include <cstdio>
#include <string>
#include <vector>

#include "se_runtime/options.h"

#include "expect.h"

namespace {
using se_test::expect;

bool parses(std::vector<char const*> args, std::string* error) {
  args.insert(args.begin(), "se_runtime");
  error->clear();
  return se_runtime::parse_options(static_cast<int>(args.size()), args.data(), error).has_value();
}
}  // namespace

int main() {
  std::vector<int64_t> ids;
  expect(se_runtime::parse_ids("1,2, 30", &ids) && ids == std::vector<int64_t>{1, 2, 30}, "id list");
  expect(!se_runtime::parse_ids("1,,2", &ids), "empty item refused");
  expect(!se_runtime::parse_ids("1,-2", &ids), "negative id refused");
  expect(!se_runtime::parse_ids("", &ids), "empty list refused");

  std::string err;
  expect(parses({"generate", "--engine", "e", "--plugin", "p", "--ids", "5,6", "--new-tokens", "4"}, &err),
         "generate options");
  expect(!parses({"generate", "--engine", "e", "--plugin", "p"}, &err) && err.find("--ids") != std::string::npos,
         "generate without ids names --ids");
  expect(!parses({"bench", "--plugin", "p"}, &err) && err.find("--engine") != std::string::npos, "engine required");
  expect(!parses({"bench", "--engine", "e", "--plugin", "p", "--runs", "0"}, &err) &&
             err.find("--runs") != std::string::npos,
         "bad --runs value named");
  expect(!parses({"bench", "--engine", "e", "--plugin", "p", "--frobnicate", "1"}, &err) &&
             err.find("--frobnicate") != std::string::npos,
         "unknown flag named");
  expect(!parses({"serve"}, &err) && err.find("serve") != std::string::npos, "unknown mode named");
  std::vector<char const*> full = {"se_runtime", "bench", "--engine", "e", "--plugin", "p", "--dense-engine", "d",
                                   "--prompt-len", "64", "--new-tokens", "16", "--runs", "5", "--warmup", "0", "--json"};
  const auto o = se_runtime::parse_options(static_cast<int>(full.size()), full.data(), &err);
  expect(o && o->dense_engine == "d" && o->prompt_len == 64 && o->new_tokens == 16 && o->runs == 5 &&
             o->warmup == 0 && o->json,
         "bench options");

  expect(se_runtime::present_name_for("past_key_values.3.key") == "present.3.key", "kv key name");
  expect(se_runtime::present_name_for("past_key_values.12.value") == "present.12.value", "kv value name");
  expect(se_runtime::present_name_for("input_ids").empty(), "non-cache input");
  const float v[] = {0.5f, 3.0f, -1.0f, 3.0f};
  expect(se_runtime::argmax(v, 4) == 1, "argmax first of ties");
  expect(se_runtime::median({3.0, 1.0, 2.0}) == 2.0 && se_runtime::median({4.0, 1.0}) == 2.5, "median");
  std::printf("%s: se_runtime option tests (%d failures)\n", se_test::failures() ? "FAIL" : "ok", se_test::failures());
  return se_test::failures() ? 1 : 0;
}
