// The NVSHMEM of the CPU emulator (see csrc/emu/include/nvshmem.h for the model and what differs from NVSHMEM).
//
// Bootstrap: every PE makes its heap a memfd, announces "pid fd bytes" in a /dev/shm file named after the unique
// id's token and its PE, and maps every peer's heap through /proc/<pid>/fd/<fd> (same user, so no ptrace rights
// beyond reading are needed). Nothing else is shared: allocation is deterministic per PE, and the one host
// collective, the barrier, uses words at the start of PE 0's heap.
#include <nvshmem.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <iterator>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "../common/exception.hpp"
#include "emu_device.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using ep::detail::concat;

// Every heap is mapped at a multiple of this, so nvshmem_align's alignment holds for absolute addresses too.
constexpr size_t kHeapAlignment = size_t{2} << 20;
// The start of every heap, never handed out: in PE 0's heap, word p counts the barriers PE p has entered.
constexpr size_t kReservedBytes = size_t{64} << 10;
constexpr int kMaxPes = static_cast<int>(kReservedBytes / sizeof(uint64_t));
constexpr size_t kDefaultHeapBytes = size_t{1} << 30;  // NVSHMEM's own default
constexpr double kDefaultTimeoutS = 100.0;             // deep_ep_py.config's default
constexpr unsigned kFullWarp = 0xffffffffu;

// Late network writes. Over a NIC, NVSHMEM makes a put visible to the target's kernels only once the target has
// enforced consistency: its wait and test calls end with that step (a read that flushes the NIC's earlier writes,
// where the platform may reorder them), which a plain acquire-load poll of the signal skips. The emulator plays
// that worst case for puts to a PE outside the sender's P2P domain (DEEP_EP_PY_EMULATE_P2P_PES): the data lands
// in the target's shadow of its heap, the destination reads kLatePoison, and the range joins the target's pending
// list; the target's next nvshmem_uint64_test that holds, or host barrier, copies every pending range into its
// heap. A kernel that reads rows without that step reads poison. A full list delivers at once (early visibility
// is always allowed).
constexpr uint8_t kLatePoison = 0xff;
constexpr size_t kMaxPendingWrites = size_t{1} << 18;

struct PendingWrites {
    uint32_t lock;  // 0 free, 1 held: by the target delivering, or a sender adding
    uint32_t unused;
    uint64_t count;
    struct Range {
        uint64_t offset, bytes;
    } ranges[kMaxPendingWrites];
};

// What nvshmemx_uniqueid_t::internal carries.
struct UniqueIdPayload {
    uint8_t token[16];
    int32_t creator_pid;
};
static_assert(sizeof(UniqueIdPayload) <= sizeof(nvshmemx_uniqueid_t::internal));

struct State {
    int num_inits = 0;
    bool finalized = false;  // a last finalize ran: NVSHMEM cannot start again in this process
    int my_pe = -1;
    int n_pes = 0;
    size_t heap_bytes = 0;
    double timeout_s = kDefaultTimeoutS;
    int p2p_pes = 0;  // PEs share a P2P domain in consecutive groups of this many (see p2p_pes_from_env)
    std::vector<uint8_t*> heaps;           // every PE's heap as mapped in this process; heaps[my_pe] is our own
    std::map<size_t, size_t> free_ranges;  // heap offset -> bytes; neighbours always merged
    std::map<size_t, size_t> allocations;  // heap offset handed out -> bytes
    uint64_t barriers_entered = 0;
};

// Written only by the host API (serialized, as NVSHMEM_THREAD_SERIALIZED demands); emulated device threads only
// read it, while a kernel runs.
State state;

[[noreturn]] void fail(const std::string& message) { throw ep::EPException("NVSHMEM emulator: " + message); }

[[noreturn]] void fail_errno(const std::string& call) {
    fail(concat(call, " failed: ", std::strerror(errno)));
}

// Device functions cannot throw through the emulated kernel: they stop the process, as a GPU trap would.
[[noreturn]] void device_fault(const char* what, const std::string& why) {
    std::fprintf(stderr, "NVSHMEM emulator: %s (PE %d): %s\n", what, state.my_pe, why.c_str());
    std::abort();
}

void require_initialized(const char* what) {
    if (state.num_inits == 0) fail(concat(what, " called before NVSHMEM was initialised"));
}

std::chrono::steady_clock::time_point deadline_after(double seconds) {
    return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

// NVSHMEM_SYMMETRIC_SIZE as NVSHMEM reads it: bytes, optionally with a binary K/M/G/T suffix.
size_t heap_bytes_from_env() {
    const char* raw = std::getenv("NVSHMEM_SYMMETRIC_SIZE");
    if (raw == nullptr || *raw == '\0') return kDefaultHeapBytes;
    const auto invalid = [raw] {
        fail(concat("NVSHMEM_SYMMETRIC_SIZE='", raw, "' is not a size (e.g. 1073741824, 1G)"));
    };
    if (!std::isdigit(static_cast<unsigned char>(raw[0]))) invalid();
    char* end = nullptr;
    errno = 0;
    const unsigned long long number = std::strtoull(raw, &end, 10);
    unsigned shift = 0;
    switch (*end) {
        case '\0': break;
        case 'k': case 'K': shift = 10; break;
        case 'm': case 'M': shift = 20; break;
        case 'g': case 'G': shift = 30; break;
        case 't': case 'T': shift = 40; break;
        default: invalid();
    }
    if (shift != 0) ++end;
    // At most half the address space, so rounding up to kHeapAlignment cannot overflow.
    if (errno != 0 || *end != '\0' || number == 0 || number > (SIZE_MAX >> shift) >> 1) invalid();
    const size_t bytes = static_cast<size_t>(number) << shift;
    return (bytes + kHeapAlignment - 1) / kHeapAlignment * kHeapAlignment;
}

// DEEP_EP_PY_TIMEOUT_S, the bound on every wait for peers across deep_ep_py.
double timeout_s_from_env() {
    const char* raw = std::getenv("DEEP_EP_PY_TIMEOUT_S");
    if (raw == nullptr || *raw == '\0') return kDefaultTimeoutS;
    char* end = nullptr;
    const double seconds = std::strtod(raw, &end);
    if (*end != '\0' || !std::isfinite(seconds) || !(seconds > 0))
        fail(concat("DEEP_EP_PY_TIMEOUT_S='", raw, "' is not a positive number of seconds"));
    return seconds;
}

// DEEP_EP_PY_EMULATE_P2P_PES=k: consecutive groups of k PEs share an (emulated) NVLink domain, and nvshmem_ptr is
// null for a PE outside this PE's group, so the kernels reach it through puts and signals, as over a NIC. Every PE
// (the default) takes the kernels' P2P stores everywhere; 1 takes their put paths everywhere.
int p2p_pes_from_env(int n_pes) {
    const char* raw = std::getenv("DEEP_EP_PY_EMULATE_P2P_PES");
    if (raw == nullptr || *raw == '\0') return n_pes;
    char* end = nullptr;
    const long value = std::strtol(raw, &end, 10);
    if (*end != '\0' || value < 1 || n_pes % value != 0)
        fail(concat("DEEP_EP_PY_EMULATE_P2P_PES='", raw, "' is not a positive divisor of the ", n_pes, " PEs"));
    return static_cast<int>(value);
}

std::string pe_list(const std::vector<int>& pes) {
    std::string text;
    for (const int pe : pes) text += (text.empty() ? "" : ", ") + std::to_string(pe);
    return text;
}

// Closes the descriptor it owns when it goes out of scope.
class FileDescriptor {
public:
    explicit FileDescriptor(int fd) : fd_(fd) {}
    FileDescriptor(const FileDescriptor&) = delete;
    FileDescriptor& operator=(const FileDescriptor&) = delete;
    ~FileDescriptor() {
        if (fd_ >= 0) ::close(fd_);
    }
    int get() const { return fd_; }

private:
    int fd_;
};

// What a PE's memfd holds: its heap, the shadow of its heap (where late network writes land), its pending list.
size_t mapped_bytes(size_t heap_bytes) {
    const size_t page = 4096;
    return 2 * heap_bytes + (sizeof(PendingWrites) + page - 1) / page * page;
}

// Maps `bytes` of the file shared and read-write, at a kHeapAlignment boundary: reserve that much more address
// space, place the file in it, and give back the slack on either side.
uint8_t* map_heap(int fd, size_t bytes, const std::string& whose) {
    void* reservation = mmap(nullptr, bytes + kHeapAlignment, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                             -1, 0);
    if (reservation == MAP_FAILED) fail_errno(concat("reserving address space for ", whose));
    const auto start = reinterpret_cast<uintptr_t>(reservation);
    const uintptr_t heap = (start + kHeapAlignment - 1) & ~(kHeapAlignment - 1);
    if (mmap(reinterpret_cast<void*>(heap), bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) ==
        MAP_FAILED) {
        const int error = errno;
        munmap(reservation, bytes + kHeapAlignment);
        errno = error;
        fail_errno(concat("mapping ", whose));
    }
    if (heap > start) munmap(reservation, heap - start);
    const uintptr_t slack_end = start + bytes + kHeapAlignment;
    if (slack_end > heap + bytes) munmap(reinterpret_cast<void*>(heap + bytes), slack_end - (heap + bytes));
    return reinterpret_cast<uint8_t*>(heap);
}

std::string rendezvous_path(const UniqueIdPayload& id, int pe) {
    std::string path = "/dev/shm/deep_ep_py_emu_";
    char hex[3];
    for (const uint8_t byte : id.token) {
        std::snprintf(hex, sizeof(hex), "%02x", byte);
        path += hex;
    }
    return path + "_" + std::to_string(pe);
}

// Written under a temporary name and renamed, so a reader sees the whole line or no file.
void publish_heap(const std::string& path, int fd, size_t bytes) {
    const std::string temporary = path + ".tmp";
    FILE* file = std::fopen(temporary.c_str(), "w");
    if (file == nullptr) fail_errno(concat("creating ", temporary));
    const bool written = std::fprintf(file, "%d %d %zu\n", static_cast<int>(getpid()), fd, bytes) > 0;
    if (std::fclose(file) != 0 || !written || std::rename(temporary.c_str(), path.c_str()) != 0) {
        const int error = errno;
        std::remove(temporary.c_str());
        errno = error;
        fail_errno(concat("publishing ", path));
    }
}

// Maps a peer's heap once its file exists; returns nullptr while it does not.
uint8_t* map_published_heap(const std::string& path, int pe) {
    FILE* file = std::fopen(path.c_str(), "r");
    if (file == nullptr) {
        if (errno == ENOENT) return nullptr;
        fail_errno(concat("opening ", path));
    }
    int pid = 0, fd = 0;
    size_t bytes = 0;
    const int fields = std::fscanf(file, "%d %d %zu", &pid, &fd, &bytes);
    std::fclose(file);
    if (fields != 3) fail(concat(path, " does not hold 'pid fd bytes'"));
    if (bytes != state.heap_bytes)
        fail(concat("PE ", pe, " has a ", bytes, "-byte symmetric heap, PE ", state.my_pe, " one of ", state.heap_bytes,
                    " bytes: every rank needs the same NVSHMEM_SYMMETRIC_SIZE"));
    const std::string proc_path = concat("/proc/", pid, "/fd/", fd);
    const FileDescriptor heap_fd(::open(proc_path.c_str(), O_RDWR | O_CLOEXEC));
    if (heap_fd.get() < 0)
        fail_errno(concat("opening PE ", pe, "'s heap as ", proc_path, " (has that process exited?)"));
    return map_heap(heap_fd.get(), mapped_bytes(bytes), concat("PE ", pe, "'s heap"));
}

uint8_t* shadow_of(int pe) { return state.heaps[pe] + state.heap_bytes; }
PendingWrites* pending_of(int pe) { return reinterpret_cast<PendingWrites*>(state.heaps[pe] + 2 * state.heap_bytes); }

bool is_network_peer(int pe) { return pe / state.p2p_pes != state.my_pe / state.p2p_pes; }

// Held for a memcpy at most, by an emulated thread that does not switch fibers inside: spinning cannot deadlock.
void lock_pending(PendingWrites* pending) {
    while (__atomic_exchange_n(&pending->lock, 1u, __ATOMIC_ACQUIRE) != 0) std::this_thread::yield();
}
void unlock_pending(PendingWrites* pending) { __atomic_store_n(&pending->lock, 0u, __ATOMIC_RELEASE); }

// A network put of `bytes` to `offset` in pe's heap (see kLatePoison).
void put_late(size_t offset, const void* source, size_t bytes, int pe) {
    PendingWrites* pending = pending_of(pe);
    lock_pending(pending);
    std::memmove(shadow_of(pe) + offset, source, bytes);
    if (pending->count < kMaxPendingWrites) {
        std::memset(state.heaps[pe] + offset, kLatePoison, bytes);
        pending->ranges[pending->count++] = {offset, bytes};
    } else {
        std::memcpy(state.heaps[pe] + offset, shadow_of(pe) + offset, bytes);
    }
    unlock_pending(pending);
}

// The consistency step at this PE: every network put that reached it so far becomes visible.
void deliver_late_writes() {
    PendingWrites* pending = pending_of(state.my_pe);
    if (__atomic_load_n(&pending->count, __ATOMIC_ACQUIRE) == 0) return;
    lock_pending(pending);
    for (uint64_t i = 0; i < pending->count; ++i) {
        const PendingWrites::Range& range = pending->ranges[i];
        std::memcpy(state.heaps[state.my_pe] + range.offset, shadow_of(state.my_pe) + range.offset, range.bytes);
    }
    pending->count = 0;
    unlock_pending(pending);
}

// Word p of PE 0's reserved bytes counts the barriers PE p has entered: no reset between barriers, and on a
// timeout the PEs still missing are known by name.
void barrier_all(const char* what) {
    uint64_t* entered = reinterpret_cast<uint64_t*>(state.heaps[0]);
    const uint64_t round = ++state.barriers_entered;
    __atomic_store_n(entered + state.my_pe, round, __ATOMIC_RELEASE);
    const auto deadline = deadline_after(state.timeout_s);
    for (int pe = 0; pe < state.n_pes; ++pe) {
        while (__atomic_load_n(entered + pe, __ATOMIC_ACQUIRE) < round) {
            if (Clock::now() > deadline) {
                std::vector<int> missing;
                for (int other = 0; other < state.n_pes; ++other)
                    if (__atomic_load_n(entered + other, __ATOMIC_ACQUIRE) < round) missing.push_back(other);
                throw ep::EPTimeoutException(concat("NVSHMEM emulator: ", what, ": PE ", state.my_pe, " of ",
                                                    state.n_pes, " waited ", state.timeout_s, " s at barrier ", round,
                                                    " for PEs ", pe_list(missing), " (DEEP_EP_PY_TIMEOUT_S)"));
            }
            std::this_thread::sleep_for(std::chrono::microseconds(20));
        }
    }
    // Puts issued before a barrier are visible after it.
    deliver_late_writes();
}

void unmap_heaps() {
    for (uint8_t* heap : state.heaps)
        if (heap != nullptr) munmap(heap, mapped_bytes(state.heap_bytes));
    const bool finalized = state.finalized;
    state = State{};
    state.finalized = finalized;
}

void join(const nvshmemx_init_attr_t& attr) {
    UniqueIdPayload id;
    std::memcpy(&id, attr.uniqueid.internal, sizeof(id));
    state.my_pe = attr.uniqueid_rank;
    state.n_pes = attr.uniqueid_n_pes;
    state.heap_bytes = heap_bytes_from_env();
    state.timeout_s = timeout_s_from_env();
    state.p2p_pes = p2p_pes_from_env(state.n_pes);
    state.heaps.assign(static_cast<size_t>(state.n_pes), nullptr);

    const FileDescriptor own_fd(memfd_create("deep_ep_py_emu_heap", MFD_CLOEXEC));
    if (own_fd.get() < 0) fail_errno("memfd_create");
    // Sparse: pages exist once touched.
    if (ftruncate(own_fd.get(), static_cast<off_t>(mapped_bytes(state.heap_bytes))) != 0)
        fail_errno(concat("ftruncate of the symmetric heap to ", mapped_bytes(state.heap_bytes), " bytes"));
    state.heaps[state.my_pe] = map_heap(own_fd.get(), mapped_bytes(state.heap_bytes), "this PE's heap");

    const std::string own_path = rendezvous_path(id, state.my_pe);
    try {
        publish_heap(own_path, own_fd.get(), state.heap_bytes);
        const auto deadline = deadline_after(state.timeout_s);
        for (;;) {
            std::vector<int> missing;
            for (int pe = 0; pe < state.n_pes; ++pe) {
                if (state.heaps[pe] == nullptr) state.heaps[pe] = map_published_heap(rendezvous_path(id, pe), pe);
                if (state.heaps[pe] == nullptr) missing.push_back(pe);
            }
            if (missing.empty()) break;
            if (Clock::now() > deadline)
                throw ep::EPTimeoutException(concat(
                    "NVSHMEM emulator: nvshmem init: PE ", state.my_pe, " of ", state.n_pes, " waited ",
                    state.timeout_s, " s for PEs ", pe_list(missing), " to join (unique id made by pid ",
                    id.creator_pid, "; DEEP_EP_PY_TIMEOUT_S): did every rank init with the same unique id?"));
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        // Past this barrier every PE has mapped every heap: the files (and our descriptor) have served.
        barrier_all("nvshmem init");
    } catch (...) {
        std::remove(own_path.c_str());
        throw;
    }
    std::remove(own_path.c_str());
    state.free_ranges = {{kReservedBytes, state.heap_bytes - kReservedBytes}};
}

// ---- Device-side helpers --------------------------------------------------------------------------------------

// The offset in this PE's heap of [address, address + bytes), which must lie wholly inside it.
size_t heap_offset(const void* address, size_t bytes, const char* what, const char* role) {
    if (state.num_inits == 0) device_fault(what, "NVSHMEM is not initialised in this process");
    const auto begin = reinterpret_cast<uintptr_t>(state.heaps[state.my_pe]);
    const auto at = reinterpret_cast<uintptr_t>(address);
    if (at < begin || at - begin > state.heap_bytes || bytes > state.heap_bytes - (at - begin))
        device_fault(what, concat(role, " [", address, ", +", bytes, " bytes) is not inside this PE's symmetric heap [",
                                  static_cast<const void*>(state.heaps[state.my_pe]), ", +", state.heap_bytes, ")"));
    return at - begin;
}

uint8_t* remote_address(const void* address, size_t bytes, int pe, const char* what, const char* role) {
    if (pe < 0 || pe >= state.n_pes) device_fault(what, concat("PE ", pe, " out of range [0, ", state.n_pes, ")"));
    return state.heaps[pe] + heap_offset(address, bytes, what, role);
}

// Heaps share their alignment, so a word aligned here is aligned on pe too.
template <typename T>
T* remote_word(T* address, int pe, const char* what, const char* role) {
    if (reinterpret_cast<uintptr_t>(address) % alignof(T) != 0)
        device_fault(what,
                     concat(role, " ", static_cast<const void*>(address), " is not ", alignof(T), "-byte aligned"));
    return reinterpret_cast<T*>(remote_address(address, sizeof(T), pe, what, role));
}

void put(void* dest, const void* source, size_t bytes, int pe, const char* what) {
    uint8_t* target = remote_address(dest, bytes, pe, what, "dest");
    heap_offset(source, bytes, what, "source");
    if (is_network_peer(pe)) {
        put_late(static_cast<size_t>(target - state.heaps[pe]), source, bytes, pe);
        return;
    }
    // memmove: a put from a PE to itself may name the same bytes twice.
    std::memmove(target, source, bytes);
}

void signal(uint64_t* sig_addr, uint64_t value, int sig_op, int pe, const char* what) {
    uint64_t* target = remote_word(sig_addr, pe, what, "sig_addr");
    // Release: a peer that polls the signal with an acquire load then sees the data put before it.
    if (sig_op == NVSHMEM_SIGNAL_SET) __atomic_store_n(target, value, __ATOMIC_RELEASE);
    else if (sig_op == NVSHMEM_SIGNAL_ADD) __atomic_fetch_add(target, value, __ATOMIC_RELEASE);
    else device_fault(what, concat("sig_op ", sig_op, " is neither NVSHMEM_SIGNAL_SET nor NVSHMEM_SIGNAL_ADD"));
}

uint64_t digest(std::initializer_list<uint64_t> words) {
    uint64_t hash = 14695981039346656037ull;  // FNV-1a
    for (const uint64_t word : words) {
        for (int byte = 0; byte < 8; ++byte) {
            hash ^= (word >> (8 * byte)) & 0xff;
            hash *= 1099511628211ull;
        }
    }
    return hash;
}

uint64_t word_of(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer); }

// The _warp and _block variants rendezvous their group, so they exist only on emulated device threads.
void require_device_thread(const char* what) {
    if (!ep_emu::in_kernel()) device_fault(what, "a device function, called outside a kernel");
}

// A _warp call is one operation of the whole warp: every lane passes the same arguments (checked: the digests of
// all 32 must agree), lane 0 issues it, and no lane returns before it is issued.
template <typename Issue>
void issue_once_per_warp(const char* what, uint64_t arguments, Issue&& issue) {
    require_device_thread(what);
    const uint64_t* lane_arguments = ep_emu::warp_exchange(kFullWarp, arguments);
    for (unsigned lane = 0; lane < 32; ++lane) {
        if (lane_arguments[lane] != lane_arguments[0])
            device_fault(what, concat("warp ", ep_emu::warp_id(), ": lane ", lane,
                                      " passed other arguments than lane 0, or did not take part"));
    }
    if (ep_emu::lane_id() == 0) issue();
    ep_emu::warp_sync(kFullWarp);
}

// As issue_once_per_warp, for every thread of the block; thread 0 issues.
template <typename Issue>
void issue_once_per_block(const char* what, uint64_t arguments, Issue&& issue) {
    require_device_thread(what);
    // A block's threads are fibers on one OS thread, so a thread_local is per block, like __shared__. Thread 0
    // may overwrite it before the first sync: every thread finished reading the last value before the last sync.
    static thread_local uint64_t leader_arguments;
    const bool leader = ep_emu::warp_id() == 0 && ep_emu::lane_id() == 0;
    if (leader) leader_arguments = arguments;
    ep_emu::block_sync();
    if (arguments != leader_arguments)
        device_fault(what, concat("warp ", ep_emu::warp_id(), " lane ", ep_emu::lane_id(),
                                  " passed other arguments than thread 0"));
    if (leader) issue();
    ep_emu::block_sync();
}

}  // namespace

// ---- Host API -------------------------------------------------------------------------------------------------

void nvshmemx_vendor_get_version_info(int* major, int* minor, int* patch) {
    *major = NVSHMEM_VENDOR_MAJOR_VERSION;
    *minor = NVSHMEM_VENDOR_MINOR_VERSION;
    *patch = NVSHMEM_VENDOR_PATCH_VERSION;
}

int nvshmemx_get_uniqueid(nvshmemx_uniqueid_t* uniqueid) {
    if (uniqueid == nullptr) fail("nvshmemx_get_uniqueid: uniqueid is null");
    UniqueIdPayload payload{};
    if (getrandom(payload.token, sizeof(payload.token), 0) != static_cast<ssize_t>(sizeof(payload.token)))
        fail_errno("getrandom");
    payload.creator_pid = static_cast<int32_t>(getpid());
    *uniqueid = NVSHMEMX_UNIQUEID_INITIALIZER;
    std::memcpy(uniqueid->internal, &payload, sizeof(payload));
    return 0;
}

int nvshmemx_set_attr_uniqueid_args(const int myrank, const int nranks, const nvshmemx_uniqueid_t* uniqueid,
                                    nvshmemx_init_attr_t* attr) {
    if (uniqueid == nullptr || attr == nullptr) fail("nvshmemx_set_attr_uniqueid_args: null uniqueid or attr");
    if (nranks <= 0 || nranks > kMaxPes || myrank < 0 || myrank >= nranks)
        fail(concat("nvshmemx_set_attr_uniqueid_args: rank ", myrank, " of ", nranks, " (the emulator takes 1 to ",
                    kMaxPes, " PEs)"));
    if (uniqueid->version != EP_EMU_NVSHMEM_UNIQUEID_VERSION)
        fail("nvshmemx_set_attr_uniqueid_args: the unique id was not made by this emulator's nvshmemx_get_uniqueid");
    attr->uniqueid_rank = myrank;
    attr->uniqueid_n_pes = nranks;
    attr->uniqueid = *uniqueid;
    return 0;
}

int nvshmemi_init_thread(int requested_thread_support, int* provided_thread_support, unsigned int bootstrap_flags,
                         nvshmemx_init_attr_t* bootstrap_attr, nvshmemi_version_t) {
    if (bootstrap_flags != NVSHMEMX_INIT_WITH_UNIQUEID || bootstrap_attr == nullptr ||
        bootstrap_attr->uniqueid_rank < 0)
        fail("only NVSHMEMX_INIT_WITH_UNIQUEID, with nvshmemx_set_attr_uniqueid_args, is emulated");
    const nvshmemx_init_attr_t& attr = *bootstrap_attr;
    if (state.num_inits > 0) {
        if (attr.uniqueid_rank != state.my_pe || attr.uniqueid_n_pes != state.n_pes)
            fail(concat("init as PE ", attr.uniqueid_rank, " of ", attr.uniqueid_n_pes, ", but this process is PE ",
                        state.my_pe, " of ", state.n_pes, " already"));
    } else {
        // NVSHMEM's finalize keeps its bootstrap, which a later init reuses whatever rank, size and unique id it is
        // given: undefined, so refused here.
        if (state.finalized) fail("init after the last nvshmem_finalize of this process: NVSHMEM cannot restart");
        try {
            join(attr);
        } catch (...) {
            unmap_heaps();
            throw;
        }
    }
    ++state.num_inits;
    // The host state is unguarded: its callers must serialize.
    if (provided_thread_support != nullptr)
        *provided_thread_support = requested_thread_support < NVSHMEM_THREAD_SERIALIZED ? requested_thread_support
                                                                                        : NVSHMEM_THREAD_SERIALIZED;
    return 0;
}

void nvshmem_finalize() {
    require_initialized("nvshmem_finalize");
    if (--state.num_inits > 0) return;
    state.finalized = true;
    // Collective, like NVSHMEM's; the heaps go away here even when a peer never arrives.
    std::exception_ptr failure;
    try {
        barrier_all("nvshmem_finalize");
    } catch (...) {
        failure = std::current_exception();
    }
    unmap_heaps();
    if (failure) std::rethrow_exception(failure);
}

int nvshmem_my_pe() { return state.my_pe; }

int nvshmem_n_pes() { return state.n_pes; }

void* nvshmem_align(size_t alignment, size_t size) {
    require_initialized("nvshmem_align");
    if (alignment == 0 || (alignment & (alignment - 1)) != 0)
        fail(concat("nvshmem_align: alignment ", alignment, " is not a power of two"));
    if (size == 0 || alignment > state.heap_bytes) return nullptr;
    // First fit in offset order: the same calls on every PE pick the same offsets.
    for (auto range = state.free_ranges.begin(); range != state.free_ranges.end(); ++range) {
        const size_t start = range->first;
        const size_t end = start + range->second;
        const size_t offset = (start + alignment - 1) & ~(alignment - 1);
        if (offset > end || size > end - offset) continue;
        state.free_ranges.erase(range);
        if (offset > start) state.free_ranges.emplace(start, offset - start);
        if (end > offset + size) state.free_ranges.emplace(offset + size, end - (offset + size));
        state.allocations.emplace(offset, size);
        std::memset(state.heaps[state.my_pe] + offset, ep_emu::kUninitializedByte, size);
        // NVSHMEM's allocation is a barrier too: no PE touches a peer's block before that peer has it.
        barrier_all("nvshmem_align");
        return state.heaps[state.my_pe] + offset;
    }
    return nullptr;
}

void nvshmem_free(void* ptr) {
    if (ptr == nullptr) return;
    require_initialized("nvshmem_free");
    const auto address = reinterpret_cast<uintptr_t>(ptr);
    const auto begin = reinterpret_cast<uintptr_t>(state.heaps[state.my_pe]);
    const auto block = address >= begin ? state.allocations.find(address - begin) : state.allocations.end();
    if (block == state.allocations.end())
        fail(concat("nvshmem_free(", ptr, "): not a block from nvshmem_align, or freed already"));
    // On entry, as in NVSHMEM: no PE reuses the block while a peer may still be using its copy.
    barrier_all("nvshmem_free");
    size_t start = block->first;
    size_t bytes = block->second;
    state.allocations.erase(block);
    auto next = state.free_ranges.lower_bound(start);
    if (next != state.free_ranges.end() && next->first == start + bytes) {
        bytes += next->second;
        next = state.free_ranges.erase(next);
    }
    if (next != state.free_ranges.begin()) {
        const auto previous = std::prev(next);
        if (previous->first + previous->second == start) {
            start = previous->first;
            bytes += previous->second;
            state.free_ranges.erase(previous);
        }
    }
    state.free_ranges.emplace(start, bytes);
}

void nvshmem_barrier_all() {
    require_initialized("nvshmem_barrier_all");
    barrier_all("nvshmem_barrier_all");
}

// ---- Host and device API --------------------------------------------------------------------------------------

void* nvshmem_ptr(const void* ptr, int pe) {
    if (state.num_inits == 0 || pe < 0 || pe >= state.n_pes) return nullptr;
    const auto begin = reinterpret_cast<uintptr_t>(state.heaps[state.my_pe]);
    const auto at = reinterpret_cast<uintptr_t>(ptr);
    if (at < begin || at - begin >= state.heap_bytes) return nullptr;
    if (pe / state.p2p_pes != state.my_pe / state.p2p_pes) return nullptr;
    return state.heaps[pe] + (at - begin);
}

void nvshmem_quiet() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- Device API -----------------------------------------------------------------------------------------------

void nvshmem_int_p(int* dest, const int value, int pe) {
    int* target = remote_word(dest, pe, "nvshmem_int_p", "dest");
    if (is_network_peer(pe)) {
        put_late(static_cast<size_t>(reinterpret_cast<uint8_t*>(target) - state.heaps[pe]), &value, sizeof(value), pe);
        return;
    }
    __atomic_store_n(target, value, __ATOMIC_RELAXED);
}

int nvshmem_uint64_test(uint64_t* ivar, int cmp, uint64_t cmp_value) {
    const uint64_t value = __atomic_load_n(ivar, __ATOMIC_ACQUIRE);
    bool holds = false;
    switch (cmp) {
        case NVSHMEM_CMP_EQ: holds = value == cmp_value; break;
        case NVSHMEM_CMP_NE: holds = value != cmp_value; break;
        case NVSHMEM_CMP_GT: holds = value > cmp_value; break;
        case NVSHMEM_CMP_LE: holds = value <= cmp_value; break;
        case NVSHMEM_CMP_LT: holds = value < cmp_value; break;
        case NVSHMEM_CMP_GE: holds = value >= cmp_value; break;
        default: device_fault("nvshmem_uint64_test", concat("cmp ", cmp, " is not an NVSHMEM_CMP_* value"));
    }
    if (!holds) return 0;
    deliver_late_writes();
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return 1;
}

void nvshmemx_signal_op(uint64_t* sig_addr, uint64_t signal_value, int sig_op, int pe) {
    signal(sig_addr, signal_value, sig_op, pe, "nvshmemx_signal_op");
}

void nvshmemx_putmem_nbi_warp(void* dest, const void* source, size_t bytes, int pe) {
    constexpr const char* kWhat = "nvshmemx_putmem_nbi_warp";
    issue_once_per_warp(kWhat, digest({word_of(dest), word_of(source), bytes, static_cast<uint64_t>(pe)}),
                        [&] { put(dest, source, bytes, pe, kWhat); });
}

void nvshmemx_putmem_signal_nbi_warp(void* dest, const void* source, size_t bytes, uint64_t* sig_addr,
                                     uint64_t signal_value, int sig_op, int pe) {
    constexpr const char* kWhat = "nvshmemx_putmem_signal_nbi_warp";
    issue_once_per_warp(kWhat,
                        digest({word_of(dest), word_of(source), bytes, word_of(sig_addr), signal_value,
                                static_cast<uint64_t>(sig_op), static_cast<uint64_t>(pe)}),
                        [&] {
                            put(dest, source, bytes, pe, kWhat);
                            signal(sig_addr, signal_value, sig_op, pe, kWhat);
                        });
}

void nvshmemx_putmem_signal_nbi_block(void* dest, const void* source, size_t bytes, uint64_t* sig_addr,
                                      uint64_t signal_value, int sig_op, int pe) {
    constexpr const char* kWhat = "nvshmemx_putmem_signal_nbi_block";
    issue_once_per_block(kWhat,
                         digest({word_of(dest), word_of(source), bytes, word_of(sig_addr), signal_value,
                                 static_cast<uint64_t>(sig_op), static_cast<uint64_t>(pe)}),
                         [&] {
                             put(dest, source, bytes, pe, kWhat);
                             signal(sig_addr, signal_value, sig_op, pe, kWhat);
                         });
}
