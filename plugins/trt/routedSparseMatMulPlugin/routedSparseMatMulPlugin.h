// TensorRT IPluginV3 form of the RoutedSparseMatMul contract (docs/routed_sparse_matmul.md):
// name "RoutedSparseMatMul", version "1", namespace "".
//
// Inputs (as the ONNX node, after se_export.trt_onnx prepared it for TensorRT):
//   0 x [..., in] fp32|fp16   1 router_weight [in, K] fp32   2 router_bias [K] fp32
//   3 values [nnz] fp32|fp16|bf16, or int32 words holding int8/int4 codes (value_dtype field)
//   4 indices int32 words holding the packed little-endian bytes (bitmap bytes or csr16 columns,
//     zero-padded to a whole word)
//   5 row_ptr [K*out] int32   then, as the fields has_bias / has_expert_ids say: bias [K, out] fp32,
//   expert_ids [...] int32   last (int8/int4 codes only): scales [K, out, ceil(in / group_size)] fp16
// Outputs: 0 y [..., out] (x's type), 1 expert_ids [...] int32 (the routing used).
// Fields: out_features (int32), format (char: "bitmap"|"csr16"), gemv_max_tokens (int32, optional),
// has_bias and has_expert_ids (int32 0/1; graphs prepared before they existed leave them out, and a
// lone input 6 is then told apart by type: fp32 bias, int32 expert_ids);
// value_dtype (char: "fp32"|"fp16"|"bf16" for float values, "int8"|"int4" for codes) and x_dtype
// (char: "fp32"|"fp16"), so the plugin offers TensorRT exactly the one format combination the graph
// needs (no format timing on synthetic inputs); for int8/int4 codes group_size (int32) and nnz
// (int32: the value count, which the padded words of int4 codes leave ambiguous).
#pragma once

#include <NvInferRuntime.h>

#if NV_TENSORRT_MAJOR < 10
#error "RoutedSparseMatMul is an IPluginV3 plugin: it needs TensorRT 10 or newer (JetPack 6.x ships 10.3)"
#endif

#include <string>
#include <vector>

namespace se_trt {

constexpr char const* kPluginName = "RoutedSparseMatMul";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "";

// Settings that define one plugin instance (what is serialized).
struct PluginParams {
  int32_t out_features = 0;
  std::string format = "bitmap";
  int32_t gemv_max_tokens = 0;  // <= 0: the kernel library's default
  std::string value_dtype;      // "fp32" | "fp16" | "bf16" | "int8" | "int4"; "" (older graphs): any float type
  std::string x_dtype;          // "fp32" | "fp16": the one activation type offered; "" (older graphs): either
  int32_t group_size = 0;       // int8/int4: input columns per scale
  int32_t nnz = 0;              // int8/int4: kept values
  int32_t has_bias = -1;        // 0/1: input 6 is the bias; -1: not said (told by type)
  int32_t has_expert_ids = -1;  // 0/1: expert_ids follow the bias (or sit at 6); -1: not said

  bool quantized() const { return value_dtype == "int8" || value_dtype == "int4"; }
};

// Parses fields from the ONNX parser or a serialized engine; empty string on success, else why not.
std::string parse_fields(nvinfer1::PluginFieldCollection const* fc, PluginParams* out);

class RoutedSparseMatMulPlugin : public nvinfer1::IPluginV3,
                                 public nvinfer1::IPluginV3OneCore,
                                 public nvinfer1::IPluginV3OneBuild,
                                 public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit RoutedSparseMatMulPlugin(PluginParams params);
  ~RoutedSparseMatMulPlugin() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return kPluginName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

  // IPluginV3OneBuild
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override { return 2; }
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

  PluginParams const& params() const { return mParams; }

 private:
  PluginParams mParams;
  int32_t mNbInputs = 6;  // set by configurePlugin (build) and onShapeChange (run)
  std::vector<nvinfer1::PluginField> mSerialFields;
  nvinfer1::PluginFieldCollection mSerialCollection{};
};

class RoutedSparseMatMulPluginCreator : public nvinfer1::IPluginCreatorV3One {
 public:
  RoutedSparseMatMulPluginCreator();
  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
  char const* getPluginName() const noexcept override { return kPluginName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

 private:
  std::vector<nvinfer1::PluginField> mFields;
  nvinfer1::PluginFieldCollection mFieldCollection{};
};

// Logging through the logger TensorRT hands over with setLoggerFinder (stderr before that).
void log_error(std::string const& message) noexcept;

}  // namespace se_trt
