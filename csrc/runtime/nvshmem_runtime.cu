#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>

#include "../common/exception.hpp"
#include "nvshmem_runtime.hpp"

namespace ep {

namespace {

// Counts this module's successful inits not yet finalized.
int num_active_inits = 0;

std::string version_string(int major, int minor, int patch) { return detail::concat(major, ".", minor, ".", patch); }

void check_initialized(const char* what) {
    EP_HOST_ASSERT_MSG(num_active_inits > 0, what, " needs nvshmem_init() first");
}

}  // namespace

std::string nvshmem_compiled_version() {
    return version_string(NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION, NVSHMEM_VENDOR_PATCH_VERSION);
}

std::string nvshmem_host_version() {
    int major = 0, minor = 0, patch = 0;
    nvshmemx_vendor_get_version_info(&major, &minor, &patch);
    return version_string(major, minor, patch);
}

void nvshmem_check_version() {
    int major = 0, minor = 0, patch = 0;
    nvshmemx_vendor_get_version_info(&major, &minor, &patch);
    const long host = major * 10000L + minor * 100L + patch;
    const long compiled = NVSHMEM_VENDOR_MAJOR_VERSION * 10000L + NVSHMEM_VENDOR_MINOR_VERSION * 100L +
                          NVSHMEM_VENDOR_PATCH_VERSION;
    if (compiled > host) {
        throw EPException(detail::concat(
            "deep_ep_py._C was device-linked with NVSHMEM ", nvshmem_compiled_version(),
            ", newer than the host library loaded at run time (libnvshmem_host.so.3 ", nvshmem_host_version(),
            "). Install nvidia-nvshmem-cu13 >= ", nvshmem_compiled_version(),
            " or rebuild deep_ep_py against the installed NVSHMEM."));
    }
}

std::string nvshmem_get_unique_id() {
    nvshmem_check_version();
    nvshmemx_uniqueid_t unique_id = NVSHMEMX_UNIQUEID_INITIALIZER;
    NVSHMEM_CHECK(nvshmemx_get_uniqueid(&unique_id));
    return std::string(reinterpret_cast<const char*>(&unique_id), sizeof(unique_id));
}

void nvshmem_init(const std::string& unique_id_bytes, int rank, int num_ranks) {
    nvshmem_check_version();
    EP_HOST_ASSERT_MSG(unique_id_bytes.size() == sizeof(nvshmemx_uniqueid_t), "a NVSHMEM unique id has ",
                       sizeof(nvshmemx_uniqueid_t), " bytes");
    EP_HOST_ASSERT(num_ranks > 0);
    EP_HOST_ASSERT(rank >= 0);
    EP_HOST_ASSERT(rank < num_ranks);
    nvshmemx_uniqueid_t unique_id;
    std::memcpy(&unique_id, unique_id_bytes.data(), sizeof(unique_id));
    nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
    NVSHMEM_CHECK(nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &unique_id, &attr));
    // The body of nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) without its exit(-1) on failure: the
    // status comes back as an exception. nvshmemi_init_thread lives in libnvshmem_device.a, so this call also
    // initialises this module's own device state.
    const nvshmemi_version_t compiled_version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                                 NVSHMEM_VENDOR_PATCH_VERSION};
    int provided = 0;
    NVSHMEM_CHECK(nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr,
                                       compiled_version));
    // An NVSHMEM that another library of this process started is joined as it is: its PE and size, not ours.
    const int my_pe = ::nvshmem_my_pe(), n_pes = ::nvshmem_n_pes();
    if (my_pe != rank || n_pes != num_ranks) {
        ::nvshmem_finalize();  // drops only the reference this init took
        throw EPException(detail::concat("nvshmem_init as PE ", rank, " of ", num_ranks,
                                         " joined an NVSHMEM already running in this process as PE ", my_pe, " of ",
                                         n_pes, " (started outside deep_ep_py?): one process runs one NVSHMEM"));
    }
    ++num_active_inits;
}

void nvshmem_finalize() {
    check_initialized("nvshmem_finalize");
    ::nvshmem_finalize();
    --num_active_inits;
}

bool nvshmem_is_initialized() { return num_active_inits > 0; }

int nvshmem_my_pe() {
    check_initialized("nvshmem_my_pe");
    return ::nvshmem_my_pe();
}

int nvshmem_n_pes() {
    check_initialized("nvshmem_n_pes");
    return ::nvshmem_n_pes();
}

uintptr_t nvshmem_malloc(size_t num_bytes, size_t alignment) {
    check_initialized("nvshmem_malloc");
    EP_HOST_ASSERT(num_bytes > 0);
    EP_HOST_ASSERT_MSG((alignment & (alignment - 1)) == 0, "alignment must be a power of two, got ", alignment);
    void* ptr = nvshmem_align(alignment, num_bytes);
    EP_HOST_ASSERT_MSG(ptr != nullptr, "nvshmem_align(", alignment, ", ", num_bytes,
                       ") failed: the symmetric heap cannot hold it");
    // The legacy stream only, as ipc_malloc: a device-wide sync would invalidate a CUDA-graph capture that another
    // thread is running.
    CUDA_CHECK(cudaMemset(ptr, 0, num_bytes));
    CUDA_CHECK(cudaStreamSynchronize(nullptr));
    // No peer may write into this buffer before every rank has zeroed its own copy.
    ::nvshmem_barrier_all();
    return reinterpret_cast<uintptr_t>(ptr);
}

void nvshmem_free(uintptr_t ptr) {
    check_initialized("nvshmem_free");
    EP_HOST_ASSERT(ptr != 0);
    ::nvshmem_free(reinterpret_cast<void*>(ptr));
}

uintptr_t nvshmem_ptr(uintptr_t ptr, int pe) {
    check_initialized("nvshmem_ptr");
    EP_HOST_ASSERT(pe >= 0);
    EP_HOST_ASSERT(pe < ::nvshmem_n_pes());
    return reinterpret_cast<uintptr_t>(::nvshmem_ptr(reinterpret_cast<void*>(ptr), pe));
}

void nvshmem_barrier_all() {
    check_initialized("nvshmem_barrier_all");
    ::nvshmem_barrier_all();
}

}  // namespace ep
