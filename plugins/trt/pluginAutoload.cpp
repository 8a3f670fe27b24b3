// libse_trt_plugin_autoload.so: registers RoutedSparseMatMul in TensorRT's plugin registry when a
// plain dlopen loads it (polygraphy --plugins, ctypes.CDLL, LD_PRELOAD), which registers nothing
// from libse_trt_plugin.so itself: that library hands its creators to whoever calls getCreators
// (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins), and registering them at load time
// too would make those loads find the creator taken. This library is for the plain-dlopen tools
// only; it never loads libnvinfer (it looks for the one the process already has) and links none.
#include <dlfcn.h>

#include <NvInferRuntime.h>

#include <cstdio>
#include <cstdlib>
#include <string>

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);  // libse_trt_plugin.so

namespace {

#define SE_STR2(x) #x
#define SE_STR(x) SE_STR2(x)

// The registry of the libnvinfer this process has already loaded, or null (nothing is loaded).
nvinfer1::IPluginRegistry* loaded_registry() {
  for (char const* name : {"libnvinfer.so." SE_STR(NV_TENSORRT_MAJOR), "libnvinfer.so"}) {
    void* handle = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
    if (handle == nullptr) continue;
    using GetRegistry = nvinfer1::IPluginRegistry* (*)();
    auto get = reinterpret_cast<GetRegistry>(dlsym(handle, "getPluginRegistry"));
    nvinfer1::IPluginRegistry* registry = get ? get() : nullptr;
    dlclose(handle);  // drops the reference RTLD_NOLOAD took; the library stays loaded
    if (registry) return registry;
  }
  return nullptr;
}

__attribute__((constructor)) void register_on_load() {
  nvinfer1::IPluginRegistry* registry = loaded_registry();
  if (registry == nullptr) {
    std::fprintf(stderr, "[se_trt_plugin_autoload] libnvinfer is not loaded in this process: nothing registered "
                         "(import tensorrt first, or load libse_trt_plugin.so with IPluginRegistry::loadLibrary)\n");
    return;
  }
  int32_t count = 0;
  nvinfer1::IPluginCreatorInterface* const* creators = getCreators(count);
  for (int32_t i = 0; i < count; ++i) {
    auto* creator = static_cast<nvinfer1::IPluginCreatorV3One*>(creators[i]);
    if (registry->getCreator(creator->getPluginName(), creator->getPluginVersion(), creator->getPluginNamespace()))
      continue;  // already registered in this process (a loadLibrary, or a second dlopen)
    if (!registry->registerCreator(*creators[i], creator->getPluginNamespace()))
      std::fprintf(stderr, "[se_trt_plugin_autoload] TensorRT refused to register %s\n", creator->getPluginName());
  }
}

}  // namespace
