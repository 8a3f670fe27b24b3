// CPU smoke test of the TensorRT plugin library (no GPU, no libnvinfer): dlopen it as
// IPluginRegistry::loadLibrary would, then drive the creator and the plugin through TensorRT's
// interfaces: fields, capabilities, output types and shapes (with a stand-in IExprBuilder),
// format combinations, configure-time layout checks, workspace, serialize -> recreate, clone; the
// same for int8/int4 codes (values as int32 words, scales last, value count from the nnz field).
#include <dlfcn.h>

#include <NvInferRuntime.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

#include "expect.h"

namespace {

using se_test::expect;

// --- a minimal expression builder: constants and opaque symbols
class DimImpl : public apiv::VDimensionExpr {
 public:
  explicit DimImpl(int64_t v) : mValue(v) {}
  bool isConstant() const override { return mValue >= 0; }
  int64_t getConstantValue() const override { return mValue; }
  bool isSizeTensor() const override { return false; }

 private:
  int64_t mValue;
};

class Dim : public IDimensionExpr {
 public:
  explicit Dim(int64_t v) : mOwned(v) { mImpl = &mOwned; }
  ~Dim() noexcept override = default;

 private:
  DimImpl mOwned;
};

class BuilderImpl : public apiv::VExprBuilder {
 public:
  IDimensionExpr const* constant(int64_t v) override { return make(v); }
  IDimensionExpr const* operation(DimensionOperation, IDimensionExpr const&, IDimensionExpr const&) override {
    return make(-1);
  }
  IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
    return make(-1);
  }
  IDimensionExpr const* make(int64_t v) {
    mDims.push_back(std::make_unique<Dim>(v));
    return mDims.back().get();
  }

 private:
  std::vector<std::unique_ptr<Dim>> mDims;
};

class Builder : public IExprBuilder {
 public:
  explicit Builder(BuilderImpl* impl) { mImpl = impl; }
  ~Builder() noexcept override = default;
};

class Logger : public ILogger {
 public:
  void log(Severity, AsciiChar const* msg) noexcept override { last = msg; }
  std::string last;
};

class Finder : public ILoggerFinder {
 public:
  ILogger* findLogger() override { return &logger; }
  Logger logger;
};

Dims dims(std::vector<int64_t> v) {
  Dims d{};
  d.nbDims = static_cast<int32_t>(v.size());
  for (size_t i = 0; i < v.size(); ++i) d.d[i] = v[i];
  return d;
}

// Whether `build` refuses position `pos` of the 8-input, 2-output `io` with type t (and format f).
bool refuses(IPluginV3OneBuild* build, std::vector<DynamicPluginTensorDesc>& io, int32_t pos, DataType t,
             TensorFormat f = TensorFormat::kLINEAR) {
  const auto saved = io[pos];
  io[pos].desc.type = t;
  io[pos].desc.format = f;
  const bool ok = build->supportsFormatCombination(pos, io.data(), 8, 2);
  io[pos] = saved;
  return !ok;
}

DynamicPluginTensorDesc desc(DataType t, std::vector<int64_t> shape, std::vector<int64_t> max = {}) {
  DynamicPluginTensorDesc d{};
  d.desc.type = t;
  d.desc.format = TensorFormat::kLINEAR;
  d.desc.dims = dims(shape);
  d.min = d.opt = d.desc.dims;
  d.max = max.empty() ? d.desc.dims : dims(max);
  return d;
}

std::string field_string(PluginFieldCollection const* fc, char const* name) {
  for (int32_t i = 0; i < fc->nbFields; ++i)
    if (std::strcmp(fc->fields[i].name, name) == 0)
      return std::string(static_cast<char const*>(fc->fields[i].data), fc->fields[i].length);
  return "<missing>";
}

int32_t field_int(PluginFieldCollection const* fc, char const* name) {
  for (int32_t i = 0; i < fc->nbFields; ++i)
    if (std::strcmp(fc->fields[i].name, name) == 0) return *static_cast<int32_t const*>(fc->fields[i].data);
  return -12345;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::printf("usage: %s libse_trt_plugin.so\n", argv[0]);
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    std::printf("FAIL dlopen: %s\n", dlerror());
    return 1;
  }
  using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
  using SetLoggerFinder = void (*)(ILoggerFinder*);
  using WorkspaceSize = size_t (*)(int64_t, int64_t);
  auto get_creators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
  auto set_finder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
  auto ws_size = reinterpret_cast<WorkspaceSize>(dlsym(lib, "se_cuda_workspace_size"));
  if (!get_creators || !set_finder || !ws_size) {
    std::printf("FAIL: getCreators/setLoggerFinder/se_cuda_workspace_size not exported\n");
    return 1;
  }
  Finder finder;
  set_finder(&finder);
  int32_t n = 0;
  IPluginCreatorInterface* const* creators = get_creators(n);
  expect(n == 1, "one creator");
  expect(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "creator is V3One");
  auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
  expect(std::strcmp(creator->getPluginName(), "RoutedSparseMatMul") == 0, "plugin name");
  expect(std::strcmp(creator->getPluginVersion(), "1") == 0, "plugin version");
  expect(std::strcmp(creator->getPluginNamespace(), "") == 0, "plugin namespace");
  PluginFieldCollection const* names = creator->getFieldNames();
  expect(names->nbFields == 9 && std::strcmp(names->fields[6].name, "has_bias") == 0 &&
             std::strcmp(names->fields[7].name, "has_expert_ids") == 0 &&
             std::strcmp(names->fields[8].name, "x_dtype") == 0 && std::strcmp(names->fields[0].name, "out_features") == 0 &&
             std::strcmp(names->fields[1].name, "format") == 0 && std::strcmp(names->fields[3].name, "value_dtype") == 0,
         "field names");

  // fields as the ONNX parser passes them (INT -> kINT32, STRING -> kCHAR without NUL)
  const int32_t out = 48;
  char const fmt[] = {'c', 's', 'r', '1', '6'};
  PluginField fields[] = {PluginField("out_features", &out, PluginFieldType::kINT32, 1),
                          PluginField("format", fmt, PluginFieldType::kCHAR, 5)};
  PluginFieldCollection fc{2, fields};
  std::unique_ptr<IPluginV3> plugin(creator->createPlugin("mlp.up", &fc, TensorRTPhase::kBUILD));
  expect(plugin != nullptr, "createPlugin from parser fields");
  if (!plugin) return 1;
  auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
  auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
  auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  expect(core && build && runtime, "all three capabilities");
  expect(std::strcmp(core->getPluginName(), "RoutedSparseMatMul") == 0, "core name");
  expect(std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0, "build interface kind");
  expect(build->getNbOutputs() == 2, "two outputs");

  DataType in_types[6] = {DataType::kHALF, DataType::kFLOAT, DataType::kFLOAT,
                          DataType::kHALF, DataType::kINT32, DataType::kINT32};
  DataType out_types[2];
  expect(build->getOutputDataTypes(out_types, 2, in_types, 6) == 0 && out_types[0] == DataType::kHALF &&
             out_types[1] == DataType::kINT32,
         "output types follow x / int32");

  // shapes: x [batch, seq, 64] -> y [batch, seq, 48], expert_ids [batch, seq]
  BuilderImpl impl;
  Builder eb(&impl);
  DimsExprs ins[6]{};
  ins[0].nbDims = 3;
  ins[0].d[0] = impl.make(-1);
  ins[0].d[1] = impl.make(-1);
  ins[0].d[2] = impl.make(64);
  DimsExprs outs[2]{};
  expect(build->getOutputShapes(ins, 6, nullptr, 0, outs, 2, eb) == 0, "getOutputShapes");
  expect(outs[0].nbDims == 3 && outs[0].d[0] == ins[0].d[0] && outs[0].d[1] == ins[0].d[1] &&
             outs[0].d[2]->isConstant() && outs[0].d[2]->getConstantValue() == out,
         "y shape [.., out_features]");
  expect(outs[1].nbDims == 2 && outs[1].d[0] == ins[0].d[0] && outs[1].d[1] == ins[0].d[1], "expert_ids shape");

  // format combinations: K = 4, in = 64, out = 48, nnz = 1001 (csr16: 2002 bytes = 501 int32 words)
  const int64_t K = 4, in = 64, nnz = 1001;
  std::vector<DynamicPluginTensorDesc> io = {
      desc(DataType::kHALF, {1, 7, in}, {2, 512, in}), desc(DataType::kFLOAT, {in, K}), desc(DataType::kFLOAT, {K}),
      desc(DataType::kHALF, {nnz}), desc(DataType::kINT32, {(2 * nnz + 3) / 4}), desc(DataType::kINT32, {K * out}),
      desc(DataType::kFLOAT, {K, out}), desc(DataType::kINT32, {1, 7}),
      desc(DataType::kHALF, {1, 7, out}), desc(DataType::kINT32, {1, 7})};
  for (int32_t pos = 0; pos < 10; ++pos) expect(build->supportsFormatCombination(pos, io.data(), 8, 2), "accepted");
  auto rejects = [&](int32_t pos, DataType t, TensorFormat f = TensorFormat::kLINEAR) {
    return refuses(build, io, pos, t, f);
  };
  expect(rejects(0, DataType::kINT8), "x int8 rejected");
  expect(rejects(0, DataType::kHALF, TensorFormat::kCHW32), "non-linear format rejected");
  expect(rejects(1, DataType::kHALF), "router weight must be fp32");
  expect(rejects(3, DataType::kINT32), "values int32 rejected");
  expect(!rejects(3, DataType::kBF16), "bf16 values accepted");
  expect(rejects(4, DataType::kUINT8), "indices must be int32 words");
  expect(rejects(6, DataType::kINT32), "input 6 of 8 is the fp32 bias");
  expect(rejects(8, DataType::kFLOAT), "y must have x's type");
  expect(rejects(9, DataType::kFLOAT), "expert_ids output is int32");
  // 7 inputs: the optional one is bias (fp32) or expert_ids (int32)
  std::vector<DynamicPluginTensorDesc> io7(io.begin(), io.begin() + 7);
  io7.push_back(io[8]);
  io7.push_back(io[9]);
  io7[6] = desc(DataType::kINT32, {1, 7});
  expect(build->supportsFormatCombination(6, io7.data(), 7, 2), "7 inputs: expert_ids accepted at 6");
  io7[6] = desc(DataType::kFLOAT, {K, out});
  expect(build->supportsFormatCombination(6, io7.data(), 7, 2), "7 inputs: bias accepted at 6");
  expect(!build->supportsFormatCombination(0, io.data(), 5, 2), "too few inputs rejected");

  // the layout said by has_bias / has_expert_ids (se-export trt sets both): input 6 is what they say,
  // whatever its type, and the input count must match
  {
    const int32_t no = 0, yes = 1;
    PluginField lf[] = {fields[0], fields[1], PluginField("has_bias", &no, PluginFieldType::kINT32, 1),
                        PluginField("has_expert_ids", &yes, PluginFieldType::kINT32, 1)};
    PluginFieldCollection lfc{4, lf};
    std::unique_ptr<IPluginV3> ids_only(creator->createPlugin("mlp.down", &lfc, TensorRTPhase::kBUILD));
    expect(ids_only != nullptr, "createPlugin with an explicit layout");
    if (ids_only) {
      auto* lb = static_cast<IPluginV3OneBuild*>(ids_only->getCapabilityInterface(PluginCapabilityType::kBUILD));
      io7[6] = desc(DataType::kINT32, {1, 7});
      expect(lb->supportsFormatCombination(6, io7.data(), 7, 2), "has_expert_ids: int32 expert_ids at 6");
      io7[6] = desc(DataType::kFLOAT, {1, 7});
      expect(!lb->supportsFormatCombination(6, io7.data(), 7, 2), "has_bias 0: an fp32 input 6 is refused");
      expect(!lb->supportsFormatCombination(0, io.data(), 8, 2), "8 inputs refused when the layout says 7");
      finder.logger.last.clear();
      expect(lb->configurePlugin(io.data(), 8, &io[8], 2) != 0, "count mismatch refused");
      expect(finder.logger.last.find("has_bias") != std::string::npos, "refusal names the fields");
      auto* lr = static_cast<IPluginV3OneRuntime*>(ids_only->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
      PluginFieldCollection const* lser = lr->getFieldsToSerialize();
      expect(field_int(lser, "has_bias") == 0 && field_int(lser, "has_expert_ids") == 1, "layout serialized");
    }
    const int32_t two = 2;
    PluginField bf[] = {fields[0], fields[1], PluginField("has_bias", &two, PluginFieldType::kINT32, 1),
                        PluginField("has_expert_ids", &yes, PluginFieldType::kINT32, 1)};
    PluginFieldCollection bfc{4, bf};
    expect(creator->createPlugin("x", &bfc, TensorRTPhase::kBUILD) == nullptr, "has_bias 2 refused");
    PluginFieldCollection half_said{3, lf};
    expect(creator->createPlugin("x", &half_said, TensorRTPhase::kBUILD) == nullptr, "has_bias alone refused");
  }

  // value_dtype / x_dtype of a float-valued node: exactly one type each is offered
  {
    char const fp16[] = {'f', 'p', '1', '6'};
    PluginField tf[] = {fields[0], fields[1], PluginField("value_dtype", fp16, PluginFieldType::kCHAR, 4),
                        PluginField("x_dtype", fp16, PluginFieldType::kCHAR, 4)};
    PluginFieldCollection tfc{4, tf};
    std::unique_ptr<IPluginV3> typed(creator->createPlugin("mlp.gate", &tfc, TensorRTPhase::kBUILD));
    expect(typed != nullptr, "createPlugin with value_dtype/x_dtype");
    if (typed) {
      auto* tb = static_cast<IPluginV3OneBuild*>(typed->getCapabilityInterface(PluginCapabilityType::kBUILD));
      expect(tb->supportsFormatCombination(0, io.data(), 8, 2) && tb->supportsFormatCombination(3, io.data(), 8, 2),
             "fp16 x and fp16 values accepted");
      auto typed_rejects = [&](int32_t pos, DataType t) { return refuses(tb, io, pos, t); };
      expect(typed_rejects(0, DataType::kFLOAT), "x_dtype fp16: fp32 x not offered");
      expect(typed_rejects(3, DataType::kFLOAT) && typed_rejects(3, DataType::kBF16), "value_dtype fp16: one type");
      auto* trt_rt = static_cast<IPluginV3OneRuntime*>(typed->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
      PluginFieldCollection const* tser = trt_rt->getFieldsToSerialize();
      expect(field_string(tser, "value_dtype") == "fp16" && field_string(tser, "x_dtype") == "fp16",
             "value_dtype and x_dtype serialized");
    }
    char const fp8[] = {'f', 'p', '8'};
    PluginField bad[] = {fields[0], fields[1], PluginField("x_dtype", fp8, PluginFieldType::kCHAR, 3)};
    PluginFieldCollection badfc{3, bad};
    finder.logger.last.clear();
    expect(creator->createPlugin("x", &badfc, TensorRTPhase::kBUILD) == nullptr &&
               finder.logger.last.find("fp8") != std::string::npos,
           "unknown x_dtype refused, named");
  }

  // configure-time layout checks and workspace from the profile's max shape
  std::vector<DynamicPluginTensorDesc> outs_desc = {io[8], io[9]};
  expect(build->configurePlugin(io.data(), 8, outs_desc.data(), 2) == 0, "consistent layout configures");
  auto bad = io;
  bad[5] = desc(DataType::kINT32, {K * out + 1});
  finder.logger.last.clear();
  expect(build->configurePlugin(bad.data(), 8, outs_desc.data(), 2) != 0, "wrong row_ptr length refused");
  expect(finder.logger.last.find("row_ptr") != std::string::npos, "refusal logged through TensorRT's logger");
  bad = io;
  bad[4] = desc(DataType::kINT32, {nnz});
  expect(build->configurePlugin(bad.data(), 8, outs_desc.data(), 2) != 0, "csr16 words != ceil(2 nnz / 4) refused");
  expect(build->getWorkspaceSize(io.data(), 8, outs_desc.data(), 2) == ws_size(2 * 512, K),
         "workspace sized for max tokens");

  // serialize -> recreate (runtime phase) -> same fields; clone; attachToContext
  PluginFieldCollection const* ser = runtime->getFieldsToSerialize();
  expect(field_int(ser, "out_features") == out && field_string(ser, "format") == "csr16", "serialized fields");
  std::unique_ptr<IPluginV3> again(creator->createPlugin("mlp.up", ser, TensorRTPhase::kRUNTIME));
  expect(again != nullptr, "recreated from serialized fields");
  if (again) {
    auto* rt2 = static_cast<IPluginV3OneRuntime*>(again->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* ser2 = rt2->getFieldsToSerialize();
    expect(field_int(ser2, "out_features") == out && field_string(ser2, "format") == "csr16" &&
               field_int(ser2, "gemv_max_tokens") == field_int(ser, "gemv_max_tokens"),
           "round trip keeps every field");
  }
  std::unique_ptr<IPluginV3> copy(plugin->clone());
  expect(copy && copy.get() != plugin.get(), "clone");
  std::unique_ptr<IPluginV3> attached(runtime->attachToContext(nullptr));
  expect(attached != nullptr, "attachToContext");

  // bad fields -> nullptr with a logged reason
  char const bad_fmt[] = "coo";
  PluginField bad_fields[] = {PluginField("out_features", &out, PluginFieldType::kINT32, 1),
                              PluginField("format", bad_fmt, PluginFieldType::kCHAR, 3)};
  PluginFieldCollection bad_fc{2, bad_fields};
  finder.logger.last.clear();
  expect(creator->createPlugin("x", &bad_fc, TensorRTPhase::kBUILD) == nullptr, "unknown format refused");
  expect(finder.logger.last.find("coo") != std::string::npos, "reason names the bad format");
  PluginFieldCollection no_out{1, bad_fields + 1};
  expect(creator->createPlugin("x", &no_out, TensorRTPhase::kBUILD) == nullptr, "missing out_features refused");

  // int8/int4 codes: values as int32 words of the code bytes, scales (fp16) last; the value count
  // comes from the nnz field (int4: ceil(nnz / 2) bytes, so the words alone leave it ambiguous)
  {
    const int32_t group = 32, qnnz = 1001;
    char const int4[] = {'i', 'n', 't', '4'};
    char const fmt_bitmap[] = {'b', 'i', 't', 'm', 'a', 'p'};
    PluginField qf[] = {PluginField("out_features", &out, PluginFieldType::kINT32, 1),
                        PluginField("format", fmt_bitmap, PluginFieldType::kCHAR, 6),
                        PluginField("value_dtype", int4, PluginFieldType::kCHAR, 4),
                        PluginField("group_size", &group, PluginFieldType::kINT32, 1),
                        PluginField("nnz", &qnnz, PluginFieldType::kINT32, 1)};
    PluginFieldCollection qfc{5, qf};
    std::unique_ptr<IPluginV3> qplugin(creator->createPlugin("mlp.down", &qfc, TensorRTPhase::kBUILD));
    expect(qplugin != nullptr, "int4 plugin from parser fields");
    if (qplugin) {
      auto* qb = static_cast<IPluginV3OneBuild*>(qplugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
      auto* qr = static_cast<IPluginV3OneRuntime*>(qplugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
      const int64_t groups = (in + group - 1) / group;
      // x, G, b, values (ceil(ceil(1001 / 2) / 4) = 126 words), bitmap (4*48*8 bytes = 384 words),
      // row_ptr, bias, scales; y, expert_ids
      std::vector<DynamicPluginTensorDesc> q = {
          desc(DataType::kHALF, {1, 7, in}, {2, 512, in}), desc(DataType::kFLOAT, {in, K}),
          desc(DataType::kFLOAT, {K}), desc(DataType::kINT32, {126}), desc(DataType::kINT32, {K * out * 8 / 4}),
          desc(DataType::kINT32, {K * out}), desc(DataType::kFLOAT, {K, out}), desc(DataType::kHALF, {K, out, groups}),
          desc(DataType::kHALF, {1, 7, out}), desc(DataType::kINT32, {1, 7})};
      for (int32_t pos = 0; pos < 10; ++pos) expect(qb->supportsFormatCombination(pos, q.data(), 8, 2), "int4 io accepted");
      auto q_rejects = [&](int32_t pos, DataType t) { return refuses(qb, q, pos, t); };
      expect(q_rejects(3, DataType::kHALF), "int4 codes must come as int32 words");
      expect(q_rejects(7, DataType::kFLOAT), "scales are fp16");
      expect(q_rejects(6, DataType::kHALF), "input 6 is the fp32 bias (or int32 expert_ids)");
      std::vector<DynamicPluginTensorDesc> qo = {q[8], q[9]};
      expect(qb->configurePlugin(q.data(), 8, qo.data(), 2) == 0, "int4 layout configures");
      auto qbad = q;
      qbad[3] = desc(DataType::kINT32, {(qnnz + 3) / 4});  // int8's word count
      finder.logger.last.clear();
      expect(qb->configurePlugin(qbad.data(), 8, qo.data(), 2) != 0, "int4 words of int8 size refused");
      expect(finder.logger.last.find("int4 codes") != std::string::npos, "refusal names the codes");
      qbad = q;
      qbad[7] = desc(DataType::kHALF, {K, out, groups + 1});
      expect(qb->configurePlugin(qbad.data(), 8, qo.data(), 2) != 0, "scales of the wrong size refused");
      std::vector<DynamicPluginTensorDesc> q7(q.begin(), q.begin() + 6);  // no bias, no ids: 7 inputs
      q7.push_back(q[7]);
      expect(qb->supportsFormatCombination(6, q7.data(), 7, 2) && !qb->supportsFormatCombination(0, q.data(), 6, 2),
             "7 inputs are the six plus the scales; six are too few");
      PluginFieldCollection const* qser = qr->getFieldsToSerialize();
      expect(field_string(qser, "value_dtype") == "int4" && field_int(qser, "group_size") == group &&
                 field_int(qser, "nnz") == qnnz,
             "int4 fields serialized");
      std::unique_ptr<IPluginV3> qagain(creator->createPlugin("mlp.down", qser, TensorRTPhase::kRUNTIME));
      expect(qagain != nullptr, "int4 plugin recreated from serialized fields");
    }
    PluginField q3[] = {qf[0], qf[1], PluginField("value_dtype", "int3", PluginFieldType::kCHAR, 4), qf[3], qf[4]};
    PluginFieldCollection q3fc{5, q3};
    finder.logger.last.clear();
    expect(creator->createPlugin("x", &q3fc, TensorRTPhase::kBUILD) == nullptr &&
               finder.logger.last.find("int3") != std::string::npos,
           "unknown value_dtype refused, named");
    PluginFieldCollection no_group{3, qf};
    expect(creator->createPlugin("x", &no_group, TensorRTPhase::kBUILD) == nullptr, "codes without group_size refused");
  }

  plugin.reset();
  again.reset();
  copy.reset();
  attached.reset();
  std::printf("%s: TensorRT plugin smoke test (%d failures)\n", se_test::failures() ? "FAIL" : "ok", se_test::failures());
  return se_test::failures() ? 1 : 0;
}
