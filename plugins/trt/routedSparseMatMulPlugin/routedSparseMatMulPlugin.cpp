// RoutedSparseMatMul IPluginV3: shape/type/format logic here, the work in the CUDA kernel library.
#include "routedSparseMatMulPlugin.h"

#include <cstring>
#include <exception>
#include <new>
#include <utility>

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

// Which optional inputs are present: after the six required ones come bias and expert_ids, as the
// fields has_bias / has_expert_ids say (a graph prepared without them: a lone input 6 is told apart
// by type, fp32 bias or int32 expert_ids), then the scales of int8/int4 codes, always last.
struct Optional {
  int32_t bias = -1, ids = -1, scales = -1;
};

bool layout_said(PluginParams const& p) { return p.has_bias >= 0 && p.has_expert_ids >= 0; }

Optional optional_inputs(PluginParams const& p, int32_t nbInputs, DataType input6) {
  Optional o;
  const int32_t plain = p.quantized() ? nbInputs - 1 : nbInputs;  // inputs before the scales
  if (p.quantized()) o.scales = nbInputs - 1;
  if (layout_said(p)) {
    if (p.has_bias) o.bias = 6;
    if (p.has_expert_ids) o.ids = 6 + p.has_bias;
  } else if (plain == 8) {
    o.bias = 6;
    o.ids = 7;
  } else if (plain == 7) {
    (input6 == DataType::kINT32 ? o.ids : o.bias) = 6;
  }
  return o;
}

// Input counts the plugin takes: 6 plus what has_bias/has_expert_ids say (6 to 8 when they are not
// said), plus the scales of int8/int4 codes.
bool input_count_ok(PluginParams const& p, int32_t nbInputs) {
  const int32_t plain = p.quantized() ? nbInputs - 1 : nbInputs;
  if (layout_said(p)) return plain == 6 + p.has_bias + p.has_expert_ids;
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
    if (name == "out_features" || name == "gemv_max_tokens" || name == "group_size" || name == "nnz" ||
        name == "has_bias" || name == "has_expert_ids") {
      if (f.type != PluginFieldType::kINT32 || f.length != 1) return "field " + name + " must be one int32";
      int32_t v = 0;
      std::memcpy(&v, f.data, sizeof(v));  // serialized fields need not be aligned
      (name == "out_features" ? out->out_features
       : name == "gemv_max_tokens" ? out->gemv_max_tokens
       : name == "group_size"      ? out->group_size
       : name == "nnz"             ? out->nnz
       : name == "has_bias"        ? out->has_bias
                                   : out->has_expert_ids) = v;
      have_out |= name == "out_features";
    } else if (name == "format" || name == "value_dtype" || name == "x_dtype") {
      if (f.type != PluginFieldType::kCHAR) return "field " + name + " must be a string";
      std::string s(static_cast<char const*>(f.data), static_cast<size_t>(f.length));
      s.erase(s.find_last_not_of('\0') + 1);
      (name == "format" ? out->format : name == "value_dtype" ? out->value_dtype : out->x_dtype) = s;
    }
  }
  if (!have_out || out->out_features <= 0) return "field out_features (a positive int32) is missing";
  if (out->format != "bitmap" && out->format != "csr16")
    return "field format is '" + out->format + "'; expected 'bitmap' or 'csr16'";
  for (int32_t flag : {out->has_bias, out->has_expert_ids})
    if (flag < -1 || flag > 1) return "fields has_bias and has_expert_ids must be 0 or 1";
  if ((out->has_bias < 0) != (out->has_expert_ids < 0)) return "fields has_bias and has_expert_ids come together";
  const std::string& v = out->value_dtype;
  if (!v.empty() && v != "fp32" && v != "fp16" && v != "bf16" && v != "int8" && v != "int4")
    return "field value_dtype is '" + v + "'; expected fp32, fp16, bf16, int8 or int4";
  if (!out->x_dtype.empty() && out->x_dtype != "fp32" && out->x_dtype != "fp16")
    return "field x_dtype is '" + out->x_dtype + "'; expected fp32 or fp16";
  if (out->quantized()) {
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
  if (nbOutputs != 2 || !input_count_ok(mParams, nbInputs)) return -1;
  outputTypes[0] = inputTypes[kX];
  outputTypes[1] = DataType::kINT32;
  return 0;
}

int32_t RoutedSparseMatMulPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*,
                                                  int32_t, DimsExprs* outputs, int32_t nbOutputs,
                                                  IExprBuilder& exprBuilder) noexcept {
  if (!input_count_ok(mParams, nbInputs) || nbOutputs != 2 || inputs[kX].nbDims < 1) return -1;
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
  if (!input_count_ok(mParams, nbInputs) || nbOutputs != 2 || pos < 0 || pos >= nbInputs + nbOutputs) return false;
  PluginTensorDesc const& d = inOut[pos].desc;
  if (d.format != TensorFormat::kLINEAR) return false;
  const DataType t = d.type;
  if (pos == nbInputs) return t == inOut[kX].desc.type;  // y has x's type
  if (pos == nbInputs + 1) return t == DataType::kINT32;
  if (quantized && pos == nbInputs - 1) return t == DataType::kHALF;  // scales
  const int32_t plain = quantized ? nbInputs - 1 : nbInputs;
  switch (pos) {
    case kX:
      if (!mParams.x_dtype.empty()) return t == (mParams.x_dtype == "fp16" ? DataType::kHALF : DataType::kFLOAT);
      return t == DataType::kFLOAT || t == DataType::kHALF;
    case kRouterW:
    case kRouterB: return t == DataType::kFLOAT;
    case kValues:  // int8/int4 codes: their bytes as int32 words (TensorRT form)
      if (quantized) return t == DataType::kINT32;
      if (mParams.value_dtype == "fp32") return t == DataType::kFLOAT;
      if (mParams.value_dtype == "fp16") return t == DataType::kHALF;
      if (mParams.value_dtype == "bf16") return t == DataType::kBF16;
      return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
    case kIndices: return t == DataType::kINT32;  // packed bytes as int32 words (TensorRT form)
    case kRowPtr: return t == DataType::kINT32;
    default: {  // 6 and 7: bias fp32, expert_ids int32, where the layout says (or by type: see optional_inputs)
      const Optional o = optional_inputs(mParams, nbInputs, t);
      if (!layout_said(mParams) && plain == 7) return t == DataType::kFLOAT || t == DataType::kINT32;
      return pos == o.bias ? t == DataType::kFLOAT : pos == o.ids && t == DataType::kINT32;
    }
  }
}

int32_t RoutedSparseMatMulPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                                  DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
  if (!input_count_ok(mParams, nbInputs) || nbOutputs != 2) {
    const int32_t plain = layout_said(mParams) ? 6 + mParams.has_bias + mParams.has_expert_ids : -1;
    const std::string count = plain > 0 ? std::to_string(plain + (mParams.quantized() ? 1 : 0)) + " inputs"
                                        : (mParams.quantized() ? "7 to 9 inputs" : "6 to 8 inputs");
    log_error("RoutedSparseMatMul: expected " + count + (mParams.quantized() ? " (the scales last)" : "") +
              " and 2 outputs, as the fields has_bias/has_expert_ids say; got " + std::to_string(nbInputs));
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
  if (!input_count_ok(mParams, nbInputs)) return 0;
  Dims const& x = inputs[kX].max;  // sized for the profile's largest shape
  const int64_t tokens = volume(x, x.nbDims - 1), K = inputs[kRouterW].max.d[1];
  return se_cuda_workspace_size(tokens, K);
}

int32_t RoutedSparseMatMulPlugin::onShapeChange(PluginTensorDesc const*, int32_t nbInputs, PluginTensorDesc const*,
                                                int32_t nbOutputs) noexcept {
  if (!input_count_ok(mParams, nbInputs) || nbOutputs != 2) return -1;
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
  const Optional opt = optional_inputs(mParams, mNbInputs, mNbInputs >= 7 ? inputDesc[6].type : DataType::kFLOAT);
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
  if (layout_said(mParams)) {
    mSerialFields.emplace_back("has_bias", &mParams.has_bias, PluginFieldType::kINT32, 1);
    mSerialFields.emplace_back("has_expert_ids", &mParams.has_expert_ids, PluginFieldType::kINT32, 1);
  }
  for (auto const& [name, value] : {std::pair<char const*, std::string const*>{"value_dtype", &mParams.value_dtype},
                                    {"x_dtype", &mParams.x_dtype}})
    if (!value->empty())
      mSerialFields.emplace_back(name, value->c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(value->size()));
  if (mParams.quantized()) {
    mSerialFields.emplace_back("group_size", &mParams.group_size, PluginFieldType::kINT32, 1);
    mSerialFields.emplace_back("nnz", &mParams.nnz, PluginFieldType::kINT32, 1);
  }
  mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
  mSerialCollection.fields = mSerialFields.data();
  return &mSerialCollection;
}

}  // namespace se_trt
