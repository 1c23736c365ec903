// The emulator keeps the whole NVSHMEM API it provides, nvshmemx_* extensions included, in one header.
#pragma once

#include "nvshmem.h"
