// NVSHMEM bootstrap and symmetric-heap allocation for this extension. The NVSHMEM headers stay in the .cu file:
// callers (the bindings) see plain ints and bytes only.
//
// This shared library is device-linked with its own copy of libnvshmem_device.a, hence its own NVSHMEM device
// state: nvshmem_init() here initialises it, even if another module (nvshmem4py, torch) initialised the host
// library already. Every init must be matched by a nvshmem_finalize().
#pragma once

#include <cstdint>
#include <string>

namespace ep {

// "major.minor.patch" of the NVSHMEM headers and device library this module was built with.
std::string nvshmem_compiled_version();
// "major.minor.patch" of libnvshmem_host.so.3 loaded at run time.
std::string nvshmem_host_version();
// Throws EPException if the device library linked in is newer than the host library loaded.
void nvshmem_check_version();

// The nvshmemx_uniqueid_t made by rank 0, as raw bytes to broadcast to the other ranks.
std::string nvshmem_get_unique_id();
// Initialises NVSHMEM with the unique-id bootstrap (NVSHMEMX_INIT_WITH_UNIQUEID) on the current CUDA device (set it
// first). Blocks until all ranks join.
void nvshmem_init(const std::string& unique_id_bytes, int rank, int num_ranks);
void nvshmem_finalize();
bool nvshmem_is_initialized();
int nvshmem_my_pe();
int nvshmem_n_pes();

// Symmetric allocation: collective, same size on all ranks. Zero-filled. alignment must be a power of two.
uintptr_t nvshmem_malloc(size_t num_bytes, size_t alignment);
void nvshmem_free(uintptr_t ptr);
// Address of `ptr` on `pe` mapped into this process (P2P), or 0 when that PE is only reachable by RDMA.
uintptr_t nvshmem_ptr(uintptr_t ptr, int pe);
void nvshmem_barrier_all();

}  // namespace ep
