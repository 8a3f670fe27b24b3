// Creator of the RoutedSparseMatMul plugin: the ONNX parser (fields from the node's attributes:
// INT -> int32, STRING -> char) and engine deserialization (getFieldsToSerialize) both come here.
#include <exception>

#include "routedSparseMatMulPlugin.h"

using namespace nvinfer1;

namespace se_trt {

RoutedSparseMatMulPluginCreator::RoutedSparseMatMulPluginCreator() {
  mFields = {
      PluginField("out_features", nullptr, PluginFieldType::kINT32, 1),
      PluginField("format", nullptr, PluginFieldType::kCHAR, 0),
      PluginField("gemv_max_tokens", nullptr, PluginFieldType::kINT32, 1),
      PluginField("value_dtype", nullptr, PluginFieldType::kCHAR, 0),
      PluginField("group_size", nullptr, PluginFieldType::kINT32, 1),
      PluginField("nnz", nullptr, PluginFieldType::kINT32, 1),
      PluginField("has_bias", nullptr, PluginFieldType::kINT32, 1),
      PluginField("has_expert_ids", nullptr, PluginFieldType::kINT32, 1),
      PluginField("x_dtype", nullptr, PluginFieldType::kCHAR, 0),
  };
  mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
  mFieldCollection.fields = mFields.data();
}

IPluginV3* RoutedSparseMatMulPluginCreator::createPlugin(char const* name, PluginFieldCollection const* fc,
                                                         TensorRTPhase) noexcept {
  try {
    PluginParams params;
    const std::string why = parse_fields(fc, &params);
    if (!why.empty()) {
      log_error(std::string("RoutedSparseMatMul (") + (name ? name : "?") + "): " + why);
      return nullptr;
    }
    return new RoutedSparseMatMulPlugin(params);
  } catch (std::exception const& e) {
    log_error(std::string("RoutedSparseMatMul createPlugin failed: ") + e.what());
    return nullptr;
  }
}

}  // namespace se_trt
