# Cross-build se_runtime and the plugins for Jetson Orin (aarch64, sm_87) from an x86 host.
# Needs an aarch64 GNU toolchain, the CUDA cross (targets/aarch64-linux) package of the JetPack's
# CUDA version, and the Jetson's TensorRT headers copied from /usr/include/aarch64-linux-gnu:
#   cmake -S cpp_runtime -B build/jetson -G Ninja -DCMAKE_TOOLCHAIN_FILE=cpp_runtime/cmake/jetson-aarch64.cmake \
#         -DTENSORRT_INCLUDE_DIR=/path/to/jetson/include
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_CUDA_HOST_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_CUDA_ARCHITECTURES 87)
set(SE_CUDA_ARCHITECTURES 87 CACHE STRING "" FORCE)
set(CUDAToolkit_ROOT /usr/local/cuda/targets/aarch64-linux CACHE PATH "CUDA cross toolkit")
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu ${CUDAToolkit_ROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
