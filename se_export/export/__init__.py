"""ONNX export: the custom op's schema, the exporter, graph rewrites and TensorRT's form of the graph."""
