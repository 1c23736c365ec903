// NVSHMEM as the CPU emulator provides it (deep_ep_py._C_emu, built with DEEP_EP_PY_EMULATE): exactly the part of
// the API that csrc/ uses, with NVSHMEM's names and signatures, implemented in csrc/emu/nvshmem_emu.cpp.
//
// Model: one PE per process. Each PE's symmetric heap is a memfd that every other PE maps too (all PEs behave as
// one NVLink domain: nvshmem_ptr maps every PE). "Device" functions are plain host functions, called by the
// emulated CUDA threads of csrc/emu/emu_device.hpp; puts are memcpys that complete before they return. Under
// DEEP_EP_PY_EMULATE_P2P_PES, a put to a PE outside the sender's P2P domain becomes visible to that PE only at its
// next nvshmem_uint64_test that holds, or host barrier: until then its bytes read as 0xff (see nvshmem_emu.cpp).
//
// Differences from NVSHMEM a caller can see:
// - Host functions return 0 or throw ep::EPException (ep::EPTimeoutException when peers do not show up in time),
//   so the reason reaches Python instead of a bare status number.
// - Device functions that are handed a non-symmetric address, an out-of-range PE or (for the _warp/_block
//   variants) differing arguments across the group print why and abort the process, as a GPU trap would end it.
// - The declarations have C++ linkage and hidden visibility: a process may also load the real libnvshmem_host,
//   whose C symbols must never bind to these (or these to them).
#pragma once

#include <cstddef>
#include <cstdint>

#define EP_EMU_NVSHMEM_API __attribute__((visibility("hidden")))

// Reported by nvshmemx_vendor_get_version_info too, so the compiled-vs-loaded version check always passes.
#define NVSHMEM_VENDOR_MAJOR_VERSION 3
#define NVSHMEM_VENDOR_MINOR_VERSION 8
#define NVSHMEM_VENDOR_PATCH_VERSION 0

// Marks an id made by this emulator (an id from the real library is refused at init).
#define EP_EMU_NVSHMEM_UNIQUEID_VERSION 0x454d5531

enum { NVSHMEM_THREAD_SINGLE, NVSHMEM_THREAD_FUNNELED, NVSHMEM_THREAD_SERIALIZED, NVSHMEM_THREAD_MULTIPLE };

enum { NVSHMEMX_INIT_WITH_UNIQUEID = 1 << 3 };

enum nvshmemx_signal_op_t { NVSHMEM_SIGNAL_SET = 9, NVSHMEM_SIGNAL_ADD = 10 };

enum { NVSHMEM_CMP_EQ = 0, NVSHMEM_CMP_NE, NVSHMEM_CMP_GT, NVSHMEM_CMP_LE, NVSHMEM_CMP_LT, NVSHMEM_CMP_GE };

// 128 bytes like NVSHMEM's: the Python side broadcasts it as raw bytes.
struct nvshmemx_uniqueid_t {
    int version;
    char internal[124];
};
#define NVSHMEMX_UNIQUEID_INITIALIZER {EP_EMU_NVSHMEM_UNIQUEID_VERSION, {0}}

struct nvshmemx_init_attr_t {
    int uniqueid_rank;  // -1 until nvshmemx_set_attr_uniqueid_args
    int uniqueid_n_pes;
    nvshmemx_uniqueid_t uniqueid;
};
#define NVSHMEMX_INIT_ATTR_INITIALIZER {-1, -1, NVSHMEMX_UNIQUEID_INITIALIZER}

struct nvshmemi_version_t {
    int major;
    int minor;
    int patch;
};

// ---- Host API -------------------------------------------------------------------------------------------------

EP_EMU_NVSHMEM_API void nvshmemx_vendor_get_version_info(int* major, int* minor, int* patch);

// A fresh random token plus the creating pid; every PE of one job initialises with the same id.
EP_EMU_NVSHMEM_API int nvshmemx_get_uniqueid(nvshmemx_uniqueid_t* uniqueid);
EP_EMU_NVSHMEM_API int nvshmemx_set_attr_uniqueid_args(const int myrank, const int nranks,
                                                       const nvshmemx_uniqueid_t* uniqueid,
                                                       nvshmemx_init_attr_t* attr);
// Only NVSHMEMX_INIT_WITH_UNIQUEID. Heap size: NVSHMEM_SYMMETRIC_SIZE (bytes, or with a K/M/G/T suffix; default
// 1 GiB). Waits for the other PEs up to DEEP_EP_PY_TIMEOUT_S (default 100 s). Counted: a second init of the same
// (PE, n_pes) joins the first, and only the matching last nvshmem_finalize tears down.
EP_EMU_NVSHMEM_API int nvshmemi_init_thread(int requested_thread_support, int* provided_thread_support,
                                            unsigned int bootstrap_flags, nvshmemx_init_attr_t* bootstrap_attr,
                                            nvshmemi_version_t nvshmem_app_version);
EP_EMU_NVSHMEM_API void nvshmem_finalize();
EP_EMU_NVSHMEM_API int nvshmem_my_pe();
EP_EMU_NVSHMEM_API int nvshmem_n_pes();

// Collective: the same sequence of calls on every PE gives the same offsets in every heap. nullptr for size 0 or
// when the block does not fit. Alignment is exact up to 2 MiB (every heap is mapped 2 MiB-aligned).
EP_EMU_NVSHMEM_API void* nvshmem_align(size_t alignment, size_t size);
EP_EMU_NVSHMEM_API void nvshmem_free(void* ptr);
EP_EMU_NVSHMEM_API void nvshmem_barrier_all();

// ---- Host and device API --------------------------------------------------------------------------------------

// `ptr`'s address in pe's heap (every PE is mapped); nullptr when ptr is not in this PE's symmetric heap.
EP_EMU_NVSHMEM_API void* nvshmem_ptr(const void* ptr, int pe);
// Puts complete when issued here, so quiet is only the fence that orders them before later stores.
EP_EMU_NVSHMEM_API void nvshmem_quiet();

// ---- Device API -----------------------------------------------------------------------------------------------

EP_EMU_NVSHMEM_API void nvshmem_int_p(int* dest, const int value, int pe);
// 1 when *ivar (an acquire load) compares to cmp_value by cmp (NVSHMEM_CMP_*), else 0; then, when it does, the
// consistency step NVSHMEM's test ends with: here it makes visible the network puts that reached this PE
// (see "Late network writes" in nvshmem_emu.cpp).
EP_EMU_NVSHMEM_API int nvshmem_uint64_test(uint64_t* ivar, int cmp, uint64_t cmp_value);
// Signal ops on the uint64 at pe's copy of sig_addr: NVSHMEM_SIGNAL_SET (release store) or NVSHMEM_SIGNAL_ADD.
EP_EMU_NVSHMEM_API void nvshmemx_signal_op(uint64_t* sig_addr, uint64_t signal, int sig_op, int pe);
// Called by every lane of a full warp (every thread of the block) with the same arguments: one put for the
// group, then, for the _signal variants, the signal op after the data. `source` must lie in this PE's symmetric
// heap (a network transport reads registered memory only; every put in csrc/ stages its data there).
EP_EMU_NVSHMEM_API void nvshmemx_putmem_nbi_warp(void* dest, const void* source, size_t bytes, int pe);
EP_EMU_NVSHMEM_API void nvshmemx_putmem_signal_nbi_warp(void* dest, const void* source, size_t bytes,
                                                        uint64_t* sig_addr, uint64_t signal, int sig_op, int pe);
EP_EMU_NVSHMEM_API void nvshmemx_putmem_signal_nbi_block(void* dest, const void* source, size_t bytes,
                                                         uint64_t* sig_addr, uint64_t signal, int sig_op, int pe);
