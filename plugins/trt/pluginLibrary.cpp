// Entry points of the dynamic plugin library (IPluginRegistry::loadLibrary, trtexec
// --dynamicPlugins, polygraphy --plugins): getCreators lists our creators, setLoggerFinder hands
// us TensorRT's logger.
#include <cstdio>
#include <mutex>

#include "routedSparseMatMulPlugin/routedSparseMatMulPlugin.h"

namespace se_trt {
namespace {
std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder = nullptr;
}  // namespace

void log_error(std::string const& message) noexcept {
  std::lock_guard<std::mutex> lock(gLoggerMutex);
  nvinfer1::ILogger* logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
  if (logger) {
    logger->log(nvinfer1::ILogger::Severity::kERROR, message.c_str());
  } else {
    std::fprintf(stderr, "[se_trt_plugin] %s\n", message.c_str());
  }
}

}  // namespace se_trt

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  std::lock_guard<std::mutex> lock(se_trt::gLoggerMutex);
  se_trt::gLoggerFinder = finder;
}

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nbCreators) {
  static se_trt::RoutedSparseMatMulPluginCreator creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}
