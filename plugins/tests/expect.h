// A minimal check for the C++ test programs: report a failed expectation and count it.
#pragma once

#include <cstdio>

namespace se_test {

inline int& failures() {
  static int count = 0;
  return count;
}

inline void expect(bool ok, char const* what) {
  if (!ok) {
    std::printf("FAIL %s\n", what);
    ++failures();
  }
}

}  // namespace se_test
