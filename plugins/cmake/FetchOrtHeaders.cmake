# ONNX Runtime C/C++ headers (MIT, C API version 29) fetched at configure time from the npm
# registry package com.github.asus4.onnxruntime@0.4.9 (the ONNX Runtime C/C++ API headers); never committed.
# Pass -DORT_INCLUDE_DIR=... to use headers from elsewhere (e.g. an onnxruntime release).
set(SE_ORT_NPM_PACKAGE "com.github.asus4.onnxruntime@0.4.9")
set(SE_ORT_HEADER_PATH "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers")

function(se_fetch_ort_headers out_var)
  if(ORT_INCLUDE_DIR)
    set(${out_var} "${ORT_INCLUDE_DIR}" PARENT_SCOPE)
    return()
  endif()
  set(dest "${CMAKE_BINARY_DIR}/_deps/onnxruntime-headers")
  if(NOT EXISTS "${dest}/onnxruntime_lite_custom_op.h")
    find_program(NPM npm)
    if(NOT NPM)
      message(FATAL_ERROR "npm is needed to fetch the ONNX Runtime headers (${SE_ORT_NPM_PACKAGE}); "
                          "install Node.js/npm or pass -DORT_INCLUDE_DIR=<onnxruntime include dir>")
    endif()
    set(work "${CMAKE_BINARY_DIR}/_deps/npm")
    file(MAKE_DIRECTORY "${work}")
    execute_process(COMMAND "${NPM}" pack "${SE_ORT_NPM_PACKAGE}" --silent
                    WORKING_DIRECTORY "${work}" RESULT_VARIABLE rc OUTPUT_VARIABLE tgz OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(NOT rc EQUAL 0 OR NOT EXISTS "${work}/${tgz}")
      message(FATAL_ERROR "npm pack ${SE_ORT_NPM_PACKAGE} failed (${rc}); pass -DORT_INCLUDE_DIR=<dir> instead")
    endif()
    file(ARCHIVE_EXTRACT INPUT "${work}/${tgz}" DESTINATION "${work}/x" PATTERNS "${SE_ORT_HEADER_PATH}/*")
    file(MAKE_DIRECTORY "${dest}")
    file(GLOB headers "${work}/x/${SE_ORT_HEADER_PATH}/*.h")
    file(COPY ${headers} DESTINATION "${dest}")
    file(REMOVE_RECURSE "${work}")
  endif()
  set(${out_var} "${dest}" PARENT_SCOPE)
endfunction()
