// RoutedSparseMatMul IPluginV3: shape/type/format logic here, the work in the CUDA kernel library.
#include "routedSparseMatMulPlugin.h"

#include <cstring>
#include <exception>
#include <new>

#include "se_cuda_kernels.h"

using namespace nvinfer1;

namespace se_trt {
namespace {

constexpr int32_t kX = 0, kRouterW = 1, kRouterB = 2, kValues = 3, kIndices = 4, kRowPtr = 5;

int64_t volume(Dims const& d, int32_t upto = -1) {
  int64_t v = 1;
  const int32_t n = upto < 0 ? d.nbDims : upto;
  for (int32_t i = 0; i < n; ++i) v *= d.d[i];
  return v;
}

// Which optional inputs are present: after the six required ones come bias and expert_ids (one of
// them alone is told apart by type: fp32 bias, int32 expert_ids), then the scales of int8/int4
// codes, always last.
struct Optional {
  int32_t bias = -1, ids = -1, scales = -1;
};

Optional optional_inputs(int32_t nbInputs, DataType input6, bool quantized) {
  Optional o;
  const int32_t plain = quantized ? nbInputs - 1 : nbInputs;  // inputs before the scales
  if (quantized) o.scales = nbInputs - 1;
  if (plain == 8) {
    o.bias = 6;
    o.ids = 7;
  } else if (plain == 7) {
    (input6 == DataType::kINT32 ? o.ids : o.bias) = 6;
  }
  return o;
}

// Input counts the plugin takes: 6 to 8, plus the scales of int8/int4 codes.
bool input_count_ok(int32_t nbInputs, bool quantized) {
  const int32_t plain = quantized ? nbInputs - 1 : nbInputs;
  return plain >= 6 && plain <= 8;
}

// Bytes of the values: nnz floats of their type, or nnz int8 codes, or ceil(nnz / 2) int4 bytes.
int64_t code_bytes(std::string const& value_dtype, int64_t nnz) { return value_dtype == "int4" ? (nnz + 1) / 2 : nnz; }

// Bytes of the packed indices: bitmap K*out*ceil(in/8), csr16 two per kept value.
int64_t packed_index_bytes(std::string const& format, int64_t K, int64_t out, int64_t in, int64_t nnz) {
  return format == "bitmap" ? K * out * ((in + 7) / 8) : 2 * nnz;
}

int32_t format_code(std::string const& f) { return f == "csr16" ? SE_CSR16 : SE_BITMAP; }

int32_t value_code(PluginParams const& p, DataType t) {
  if (p.quantized()) return p.value_dtype == "int4" ? SE_I4 : SE_I8;
  return t == DataType::kFLOAT ? SE_F32 : t == DataType::kHALF ? SE_F16 : SE_BF16;
}

}  // namespace

std::string parse_fields(PluginFieldCollection const* fc, PluginParams* out) {
  if (fc == nullptr) return "no plugin fields given";
  bool have_out = false;
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    if (f.name == nullptr || f.data == nullptr) continue;
    const std::string name(f.name);
    if (name == "out_features" || name == "gemv_max_tokens" || name == "group_size" || name == "nnz") {
      if (f.type != PluginFieldType::kINT32 || f.length != 1) return "field " + name + " must be one int32";
      int32_t v = 0;
      std::memcpy(&v, f.data, sizeof(v));  // serialized fields need not be aligned
      (name == "out_features" ? out->out_features
       : name == "gemv_max_tokens" ? out->gemv_max_tokens
       : name == "group_size"      ? out->group_size
                                   : out->nnz) = v;
      have_out |= name == "out_features";
    } else if (name == "format" || name == "value_dtype") {
      if (f.type != PluginFieldType::kCHAR) return "field " + name + " must be a string";
      std::string s(static_cast<char const*>(f.data), static_cast<size_t>(f.length));
      s.erase(s.find_last_not_of('\0') + 1);
      (name == "format" ? out->format : out->value_dtype) = s;
    }
  }
  if (!have_out || out->out_features <= 0) return "field out_features (a positive int32) is missing";
  if (out->format != "bitmap" && out->format != "csr16")
    return "field format is '" + out->format + "'; expected 'bitmap' or 'csr16'";
  if (out->quantized()) {
    if (out->value_dtype != "int8" && out->value_dtype != "int4")
      return "field value_dtype is '" + out->value_dtype + "'; expected 'int8' or 'int4' (or absent for float values)";
    if (out->group_size < 1) return "int8/int4 codes need field group_size (a positive int32)";
    if (out->nnz < 0) return "field nnz must be >= 0";
  }
  return {};
}

RoutedSparseMatMulPlugin::RoutedSparseMatMulPlugin(PluginParams params) : mParams(std::move(params)) {}

IPluginCapability* RoutedSparseMatMulPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
  switch (type) {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
  }
  return nullptr;
}

IPluginV3* RoutedSparseMatMulPlugin::clone() noexcept {
  try {
    auto* copy = new RoutedSparseMatMulPlugin(mParams);
    copy->mNbInputs = mNbInputs;
    return copy;
  } catch (std::exception const& e) {
    log_error(std::string("RoutedSparseMatMul clone failed: ") + e.what());
    return nullptr;
  }
}

int32_t RoutedSparseMatMulPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs,
                                                     DataType const* inputTypes, int32_t nbInputs) const noexcept {
  if (nbOutputs != 2 || !input_count_ok(nbInputs, mParams.quantized())) return -1;
  outputTypes[0] = inputTypes[kX];
  outputTypes[1] = DataType::kINT32;
  return 0;
}

int32_t RoutedSparseMatMulPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*,
                                                  int32_t, DimsExprs* outputs, int32_t nbOutputs,
                                                  IExprBuilder& exprBuilder) noexcept {
  if (!input_count_ok(nbInputs, mParams.quantized()) || nbOutputs != 2 || inputs[kX].nbDims < 1) return -1;
  DimsExprs const& x = inputs[kX];
  outputs[0].nbDims = x.nbDims;
  outputs[1].nbDims = x.nbDims - 1;
  for (int32_t i = 0; i + 1 < x.nbDims; ++i) outputs[0].d[i] = outputs[1].d[i] = x.d[i];
  outputs[0].d[x.nbDims - 1] = exprBuilder.constant(mParams.out_features);
  return 0;
}

bool RoutedSparseMatMulPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut,
                                                         int32_t nbInputs, int32_t nbOutputs) noexcept {
  const bool quantized = mParams.quantized();
  if (!input_count_ok(nbInputs, quantized) || nbOutputs != 2 || pos < 0 || pos >= nbInputs + nbOutputs) return false;
  PluginTensorDesc const& d = inOut[pos].desc;
  if (d.format != TensorFormat::kLINEAR) return false;
  const DataType t = d.type;
  if (pos == nbInputs) return t == inOut[kX].desc.type;  // y has x's type
  if (pos == nbInputs + 1) return t == DataType::kINT32;
  if (quantized && pos == nbInputs - 1) return t == DataType::kHALF;  // scales
  const int32_t plain = quantized ? nbInputs - 1 : nbInputs;
  switch (pos) {
    case kX: return t == DataType::kFLOAT || t == DataType::kHALF;
    case kRouterW:
    case kRouterB: return t == DataType::kFLOAT;
    case kValues:  // int8/int4 codes: their bytes as int32 words (TensorRT form)
      return quantized ? t == DataType::kINT32 : (t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16);
    case kIndices: return t == DataType::kINT32;  // packed bytes as int32 words (TensorRT form)
    case kRowPtr: return t == DataType::kINT32;
    case 6: return plain == 8 ? t == DataType::kFLOAT : (t == DataType::kFLOAT || t == DataType::kINT32);
    default: return t == DataType::kINT32;  // 7: expert_ids
  }
}

int32_t RoutedSparseMatMulPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                                  DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
  if (!input_count_ok(nbInputs, mParams.quantized()) || nbOutputs != 2) {
    log_error(mParams.quantized() ? "RoutedSparseMatMul: expected 7 to 9 inputs (the scales last) and 2 outputs"
                                  : "RoutedSparseMatMul: expected 6 to 8 inputs and 2 outputs");
    return -1;
  }
  mNbInputs = nbInputs;
  // weights are build-time constants: check the packed layout against the attributes once here
  Dims const& x = in[kX].desc.dims;
  Dims const& g = in[kRouterW].desc.dims;
  const int64_t in_f = x.d[x.nbDims - 1], K = g.nbDims == 2 ? g.d[1] : -1, out = mParams.out_features;
  std::string why;
  if (g.nbDims != 2 || (in_f >= 0 && g.d[0] != in_f)) {
    why = "router_weight must be [in_features, K] with in_features = x's last dimension";
  } else if (K >= 0 && volume(in[kRowPtr].desc.dims) >= 0 && volume(in[kRowPtr].desc.dims) != K * out) {
    why = "row_ptr must hold K * out_features entries";
  } else if (in_f > 0 && K > 0) {
    const int64_t words = volume(in[kIndices].desc.dims), values = volume(in[kValues].desc.dims);
    const int64_t nnz = mParams.quantized() ? mParams.nnz : values;
    const int64_t bytes = packed_index_bytes(mParams.format, K, out, in_f, nnz);
    if (words >= 0 && nnz >= 0 && words != (bytes + 3) / 4)
      why = "indices must be the packed " + mParams.format + " bytes as " + std::to_string((bytes + 3) / 4) +
            " int32 words (se-export trt prepares them), got " + std::to_string(words);
    if (mParams.quantized()) {
      const int64_t value_words = (code_bytes(mParams.value_dtype, nnz) + 3) / 4;
      const int64_t groups = (in_f + mParams.group_size - 1) / mParams.group_size;
      if (values >= 0 && values != value_words)
        why = "values must be the " + std::to_string(nnz) + " " + mParams.value_dtype + " codes as " +
              std::to_string(value_words) + " int32 words (se-export trt prepares them), got " + std::to_string(values);
      else if (mParams.group_size > in_f)
        why = "group_size " + std::to_string(mParams.group_size) + " is larger than in_features " + std::to_string(in_f);
      else if (volume(in[nbInputs - 1].desc.dims) != K * out * groups)
        why = "scales must hold K * out_features * ceil(in_features / group_size) = " +
              std::to_string(K * out * groups) + " fp16 values";
    }
    if (mParams.format == "csr16" && in_f > 65536) why = "csr16 needs in_features <= 65536";
  }
  if (!why.empty()) {
    log_error("RoutedSparseMatMul: " + why);
    return -1;
  }
  return 0;
}

size_t RoutedSparseMatMulPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                                  DynamicPluginTensorDesc const*, int32_t) const noexcept {
  if (!input_count_ok(nbInputs, mParams.quantized())) return 0;
  Dims const& x = inputs[kX].max;  // sized for the profile's largest shape
  const int64_t tokens = volume(x, x.nbDims - 1), K = inputs[kRouterW].max.d[1];
  return se_cuda_workspace_size(tokens, K);
}

int32_t RoutedSparseMatMulPlugin::onShapeChange(PluginTensorDesc const*, int32_t nbInputs, PluginTensorDesc const*,
                                                int32_t nbOutputs) noexcept {
  if (!input_count_ok(nbInputs, mParams.quantized()) || nbOutputs != 2) return -1;
  mNbInputs = nbInputs;
  return 0;
}

int32_t RoutedSparseMatMulPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*,
                                          void const* const* inputs, void* const* outputs, void* workspace,
                                          cudaStream_t stream) noexcept {
  // enqueue is not told the input count: onShapeChange (always called first) recorded it
  Dims const& x = inputDesc[kX].dims;
  const int64_t tokens = volume(x, x.nbDims - 1), in_f = x.d[x.nbDims - 1];
  const int64_t K = inputDesc[kRouterW].dims.d[1];
  se_experts e{};
  e.format = format_code(mParams.format);
  e.value_dtype = value_code(mParams, inputDesc[kValues].type);
  e.num_experts = K;
  e.out_features = mParams.out_features;
  e.in_features = in_f;
  e.values = inputs[kValues];
  e.nnz = mParams.quantized() ? mParams.nnz : volume(inputDesc[kValues].dims);
  e.indices = inputs[kIndices];
  e.indices_len = e.format == SE_CSR16 ? e.nnz : packed_index_bytes(mParams.format, K, e.out_features, in_f, e.nnz);
  e.row_ptr = static_cast<int32_t const*>(inputs[kRowPtr]);
  const Optional opt =
      optional_inputs(mNbInputs, mNbInputs >= 7 ? inputDesc[6].type : DataType::kFLOAT, mParams.quantized());
  if (opt.bias >= 0 && volume(inputDesc[opt.bias].dims) > 0) e.bias = static_cast<float const*>(inputs[opt.bias]);
  if (opt.scales >= 0) {
    e.scales = static_cast<uint16_t const*>(inputs[opt.scales]);
    e.group_size = mParams.group_size;
  }
  int32_t const* ids_in = opt.ids >= 0 ? static_cast<int32_t const*>(inputs[opt.ids]) : nullptr;
  const int32_t x_dtype = inputDesc[kX].type == DataType::kHALF ? SE_F16 : SE_F32;
  char err[256] = {0};
  const size_t ws = se_cuda_workspace_size(tokens, K);
  if (se_cuda_routed_sparse_matmul(&e, static_cast<float const*>(inputs[kRouterW]),
                                   static_cast<float const*>(inputs[kRouterB]), inputs[kX], x_dtype, tokens, ids_in,
                                   static_cast<int32_t*>(outputs[1]), outputs[0], workspace, ws,
                                   mParams.gemv_max_tokens, reinterpret_cast<se_cuda_stream>(stream), err,
                                   sizeof(err))) {
    log_error(std::string("RoutedSparseMatMul enqueue: ") + err);
    return -1;
  }
  return 0;
}

IPluginV3* RoutedSparseMatMulPlugin::attachToContext(IPluginResourceContext*) noexcept { return clone(); }

PluginFieldCollection const* RoutedSparseMatMulPlugin::getFieldsToSerialize() noexcept {
  mSerialFields = {
      PluginField("out_features", &mParams.out_features, PluginFieldType::kINT32, 1),
      PluginField("format", mParams.format.c_str(), PluginFieldType::kCHAR,
                  static_cast<int32_t>(mParams.format.size())),
      PluginField("gemv_max_tokens", &mParams.gemv_max_tokens, PluginFieldType::kINT32, 1),
  };
  if (mParams.quantized()) {
    mSerialFields.emplace_back("value_dtype", mParams.value_dtype.c_str(), PluginFieldType::kCHAR,
                               static_cast<int32_t>(mParams.value_dtype.size()));
    mSerialFields.emplace_back("group_size", &mParams.group_size, PluginFieldType::kINT32, 1);
    mSerialFields.emplace_back("nnz", &mParams.nnz, PluginFieldType::kINT32, 1);
  }
  mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
  mSerialCollection.fields = mSerialFields.data();
  return &mSerialCollection;
}

}  // namespace se_trt
