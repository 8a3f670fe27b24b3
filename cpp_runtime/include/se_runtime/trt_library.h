// libnvinfer loaded with dlopen, so se_runtime builds without TensorRT libraries (headers only)
// and can say clearly what is missing at run time.
#pragma once

#include <NvInferRuntime.h>

#include <memory>
#include <string>

namespace se_runtime {

class TrtLibrary {
 public:
  // Opens `path`, or libnvinfer.so.<major> then libnvinfer.so (the lean runtime runs only
  // version-compatible plans, which se-export trt does not build); refuses a library
  // whose major version differs from the headers'. Throws std::runtime_error with the reason.
  explicit TrtLibrary(std::string const& path = "");
  ~TrtLibrary();
  TrtLibrary(TrtLibrary const&) = delete;
  TrtLibrary& operator=(TrtLibrary const&) = delete;

  // Only call after has_cuda_device(): without a GPU the runtime returns a bogus object.
  nvinfer1::IRuntime* create_runtime(nvinfer1::ILogger& logger) const;
  int32_t version() const { return mVersion; }
  std::string const& path() const { return mPath; }

 private:
  void* mHandle = nullptr;
  std::string mPath;
  int32_t mVersion = 0;
  void* mCreateRuntime = nullptr;
};

// Major version of an encoded TensorRT version (10.3.0 -> 100300 -> 10).
int32_t trt_major(int32_t encoded_version);

// cudaGetDeviceCount > 0; otherwise false and `why` says what CUDA reported.
bool has_cuda_device(std::string* why);

}  // namespace se_runtime
