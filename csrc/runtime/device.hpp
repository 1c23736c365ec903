// What GPU this process sees. Never throws: on a machine without a driver these report "no GPU".
#pragma once

#include <string>

namespace ep {

int device_count();
std::string gpu_status();

}  // namespace ep
