"""Runtimes of the op: the C++ CPU kernels, the CUDA kernels, ONNX Runtime and TensorRT."""
