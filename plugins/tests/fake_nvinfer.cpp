// A stand-in libnvinfer.so.<major> for CPU tests: exports only getPluginRegistry, whose registry
// keeps creators by (name, version, namespace) and refuses a second registration of one, as
// TensorRT's does. Nothing else of TensorRT is here; it is never installed.
#include <NvInferRuntime.h>

#include <cstring>
#include <string>
#include <tuple>
#include <vector>

using namespace nvinfer1;

namespace {

std::tuple<std::string, std::string, std::string> key_of(IPluginCreatorInterface& c, char const* ns) {
  auto* v3 = static_cast<IPluginCreatorV3One*>(&c);
  return {v3->getPluginName(), v3->getPluginVersion(), ns ? ns : ""};
}

// IPluginRegistry still declares the deprecated IPluginCreator (V2) overloads pure virtual: a
// registry must define them, so their deprecation is not ours to heed here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
class FakeRegistry : public IPluginRegistry {
 public:
  bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override { return false; }
  IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept override {
    *n = 0;
    return nullptr;
  }
  IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override {
    return nullptr;
  }
  void setErrorRecorder(IErrorRecorder* const) noexcept override {}
  IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
  bool deregisterCreator(IPluginCreator const&) noexcept override { return false; }
  bool isParentSearchEnabled() const override { return false; }
  void setParentSearchEnabled(bool const) override {}
  PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override { return nullptr; }
  void deregisterLibrary(PluginLibraryHandle) noexcept override {}
  bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const ns) noexcept override {
    if (find(key_of(creator, ns)) != nullptr) return false;
    creators_.push_back(&creator);
    keys_.push_back(key_of(creator, ns));
    return true;
  }
  IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override {
    *n = static_cast<int32_t>(creators_.size());
    return creators_.data();
  }
  IPluginCreatorInterface* getCreator(AsciiChar const* const name, AsciiChar const* const version,
                                      AsciiChar const* const ns) noexcept override {
    return find({name, version, ns ? ns : ""});
  }
  bool deregisterCreator(IPluginCreatorInterface const&) noexcept override { return false; }
  IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override { return nullptr; }
  int32_t releasePluginResource(AsciiChar const*) noexcept override { return 0; }
  IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override {
    return getAllCreators(n);
  }

 private:
  IPluginCreatorInterface* find(std::tuple<std::string, std::string, std::string> const& key) {
    for (size_t i = 0; i < keys_.size(); ++i)
      if (keys_[i] == key) return creators_[i];
    return nullptr;
  }
  std::vector<IPluginCreatorInterface*> creators_;
  std::vector<std::tuple<std::string, std::string, std::string>> keys_;
};
#pragma GCC diagnostic pop

}  // namespace

extern "C" __attribute__((visibility("default"))) IPluginRegistry* getPluginRegistry() noexcept {
  static FakeRegistry registry;
  return &registry;
}
