// libse_trt_plugin_autoload.so registers RoutedSparseMatMul in the registry of the libnvinfer a
// process already has, on a plain dlopen (polygraphy --plugins): checked against the stand-in
// libnvinfer (fake_nvinfer.cpp). `without` loads it with no libnvinfer in the process: nothing
// is registered and nothing crashes.
//   test_trt_autoload with FAKE_LIBNVINFER AUTOLOAD_LIB | test_trt_autoload without AUTOLOAD_LIB
#include <dlfcn.h>

#include <NvInferRuntime.h>

#include <cstdio>
#include <cstring>

#include "expect.h"

using namespace nvinfer1;
using se_test::expect;

namespace {
int report(char const* what) {
  std::printf("%s: %s (%d failures)\n", se_test::failures() ? "FAIL" : "ok", what, se_test::failures());
  return se_test::failures() ? 1 : 0;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "without") == 0) {
    expect(dlopen(argv[2], RTLD_NOW | RTLD_LOCAL) != nullptr, "loads without libnvinfer");
    return report("TensorRT plugin autoload without libnvinfer");
  }
  if (argc != 4 || std::strcmp(argv[1], "with") != 0) {
    std::fprintf(stderr, "usage: %s with FAKE_LIBNVINFER AUTOLOAD_LIB | without AUTOLOAD_LIB\n", argv[0]);
    return 2;
  }
  void* nvinfer = dlopen(argv[2], RTLD_NOW | RTLD_LOCAL);  // as the tensorrt Python module has it: not global
  expect(nvinfer != nullptr, "stand-in libnvinfer loads");
  if (!nvinfer) return report("TensorRT plugin autoload");
  using GetRegistry = IPluginRegistry* (*)();
  auto* registry = reinterpret_cast<GetRegistry>(dlsym(nvinfer, "getPluginRegistry"))();
  expect(registry->getCreator("RoutedSparseMatMul", "1", "") == nullptr, "nothing registered before the load");
  expect(dlopen(argv[3], RTLD_NOW | RTLD_LOCAL) != nullptr, "autoload library loads (as polygraphy's CDLL does)");
  IPluginCreatorInterface* creator = registry->getCreator("RoutedSparseMatMul", "1", "");
  expect(creator != nullptr && std::strcmp(creator->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0,
         "RoutedSparseMatMul v1 registered on load");
  int32_t n = 0;
  registry->getAllCreators(&n);
  expect(n == 1, "one creator");
  return report("TensorRT plugin autoload");
}
