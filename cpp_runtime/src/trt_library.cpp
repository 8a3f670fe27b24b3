#include "se_runtime/trt_library.h"

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <stdexcept>
#include <vector>

namespace se_runtime {

int32_t trt_major(int32_t encoded_version) { return encoded_version / 10000; }

bool has_cuda_device(std::string* why) {
  int count = 0;
  const cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess || count == 0) {
    *why = rc != cudaSuccess ? cudaGetErrorString(rc) : "no device";
    return false;
  }
  return true;
}

TrtLibrary::TrtLibrary(std::string const& path) {
  const std::string major = std::to_string(NV_TENSORRT_MAJOR);
  std::vector<std::string> candidates = path.empty()
      ? std::vector<std::string>{"libnvinfer.so." + major, "libnvinfer.so"}
      : std::vector<std::string>{path};
  std::string errors;
  for (auto const& name : candidates) {
    mHandle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (mHandle) {
      mPath = name;
      break;
    }
    errors += std::string(" ") + dlerror() + ";";
  }
  if (!mHandle)
    throw std::runtime_error("cannot load TensorRT (" + candidates.front() +
                             "): install TensorRT " + major + ".x or pass --nvinfer PATH;" + errors);
  using GetVersion = int32_t (*)();
  auto get_version = reinterpret_cast<GetVersion>(dlsym(mHandle, "getInferLibVersion"));
  mCreateRuntime = dlsym(mHandle, "createInferRuntime_INTERNAL");
  if (!get_version || !mCreateRuntime) {
    dlclose(mHandle);
    throw std::runtime_error(mPath + " is not a TensorRT runtime library (getInferLibVersion/createInferRuntime missing)");
  }
  mVersion = get_version();
  if (trt_major(mVersion) != NV_TENSORRT_MAJOR) {
    dlclose(mHandle);
    throw std::runtime_error(mPath + " is TensorRT " + std::to_string(trt_major(mVersion)) +
                             ".x but se_runtime was built with TensorRT " + major +
                             ".x headers: rebuild with -DTENSORRT_INCLUDE_DIR of the installed version");
  }
}

TrtLibrary::~TrtLibrary() {
  if (mHandle) dlclose(mHandle);
}

nvinfer1::IRuntime* TrtLibrary::create_runtime(nvinfer1::ILogger& logger) const {
  using Create = void* (*)(void*, int32_t);
  return static_cast<nvinfer1::IRuntime*>(
      reinterpret_cast<Create>(mCreateRuntime)(&logger, static_cast<int32_t>(NV_TENSORRT_VERSION)));
}

}  // namespace se_runtime
