// Multi-process self-test of the emulator's NVSHMEM (csrc/emu/nvshmem_emu.cpp), on the emulator's own launch
// (csrc/emu/device_emu.cpp). Every PE is a fork()ed child; the parent only makes the unique id and judges exit
// statuses. Not part of the extension build: tests/test_emulator_selftest.py compiles and runs it, or by hand from
// the repository root:
//
//   g++ -std=c++17 -O1 -Wall -Wextra -DDEEP_EP_PY_EMULATE -I csrc/emu/include -I /usr/local/cuda-13.0/include
//       -I csrc csrc/emu/tests/nvshmem_emu_selftest.cpp csrc/emu/nvshmem_emu.cpp csrc/emu/device_emu.cpp
//       -pthread -o /tmp/nvshmem_emu_selftest && /tmp/nvshmem_emu_selftest
#include <cuda_runtime.h>
#include <dirent.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "common/exception.hpp"

namespace {

int g_pe = -1;  // this process's PE, for messages

#define CHECK(cond)                                                                                     \
    do {                                                                                                \
        if (!(cond)) {                                                                                  \
            std::fprintf(stderr, "PE %d: %s:%d: CHECK(%s) failed\n", g_pe, __FILE__, __LINE__, #cond); \
            std::_Exit(1);                                                                              \
        }                                                                                               \
    } while (0)

constexpr int kPes = 4;
constexpr int kThreads = 64;    // two warps
constexpr size_t kRow = 1000;  // bytes per message; not a multiple of 16 on purpose

nvshmemx_uniqueid_t new_unique_id() {
    nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
    CHECK(nvshmemx_get_uniqueid(&id) == 0);
    return id;
}

// As csrc/runtime/nvshmem_runtime.cu initialises.
void init(const nvshmemx_uniqueid_t& id, int pe, int n_pes) {
    nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
    CHECK(nvshmemx_set_attr_uniqueid_args(pe, n_pes, &id, &attr) == 0);
    const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                        NVSHMEM_VENDOR_PATCH_VERSION};
    int provided = -1;
    CHECK(nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version) == 0);
    CHECK(provided == NVSHMEM_THREAD_SERIALIZED);
}

template <typename T>
T* symmetric(size_t count, size_t alignment = 128) {
    void* ptr = nvshmem_align(alignment, count * sizeof(T));
    CHECK(ptr != nullptr);
    std::memset(ptr, 0, count * sizeof(T));
    return static_cast<T*>(ptr);
}

uint8_t pattern(int src, int dst, size_t i) { return static_cast<uint8_t>(src * 31 + dst * 7 + i * 13 + 1); }

void kernel(const std::function<void()>& body, unsigned blocks = 1) {
    ep_emu::launch(dim3(blocks), dim3(kThreads), 0, body);
}

void wait_at_least(const uint64_t* word, uint64_t value) {
    while (__atomic_load_n(word, __ATOMIC_ACQUIRE) < value) ep_emu::poll_yield();
}

// Runs body(pe) in n_pes forked processes; returns each one's wait status.
std::vector<int> run_pes(int n_pes, const std::function<void(int)>& body) {
    std::vector<pid_t> children;
    for (int pe = 0; pe < n_pes; ++pe) {
        const pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            g_pe = pe;
            try {
                body(pe);
            } catch (const std::exception& e) {
                std::fprintf(stderr, "PE %d: unexpected exception: %s\n", pe, e.what());
                std::_Exit(1);
            }
            std::_Exit(0);
        }
        children.push_back(pid);
    }
    std::vector<int> statuses;
    for (const pid_t pid : children) {
        int status = 0;
        CHECK(waitpid(pid, &status, 0) == pid);
        statuses.push_back(status);
    }
    return statuses;
}

bool all_exited_zero(const std::vector<int>& statuses) {
    for (const int status : statuses)
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return false;
    return true;
}

bool all_aborted(const std::vector<int>& statuses) {
    for (const int status : statuses)
        if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGABRT) return false;
    return true;
}

// Rendezvous files the emulator left in /dev/shm (it removes its own, on success and on failure).
int leftover_rendezvous_files() {
    int count = 0;
    DIR* dir = opendir("/dev/shm");
    CHECK(dir != nullptr);
    while (const dirent* entry = readdir(dir))
        if (std::strncmp(entry->d_name, "deep_ep_py_emu_", 15) == 0) ++count;
    closedir(dir);
    return count;
}

template <typename Exception>
void expect_throw(const std::function<void()>& call, const char* needle) {
    try {
        call();
    } catch (const Exception& e) {
        std::fprintf(stderr, "PE %d: expected exception: %s\n", g_pe, e.what());
        CHECK(std::strstr(e.what(), needle) != nullptr);
        return;
    }
    CHECK(!"no exception");
}

// ---- Scenarios (each body runs as one PE) -----------------------------------------------------------------------

void allocation(int me, int n) {
    uint8_t* a = static_cast<uint8_t*>(nvshmem_align(128, 1000));
    uint8_t* b = static_cast<uint8_t*>(nvshmem_align(4096, 3 * 4096));
    uint8_t* c = static_cast<uint8_t*>(nvshmem_align(size_t{2} << 20, 100));
    CHECK(a != nullptr && b != nullptr && c != nullptr);
    CHECK(reinterpret_cast<uintptr_t>(a) % 128 == 0);
    CHECK(reinterpret_cast<uintptr_t>(b) % 4096 == 0);
    CHECK(reinterpret_cast<uintptr_t>(c) % (size_t{2} << 20) == 0);
    CHECK(nvshmem_align(8, size_t{1} << 30) == nullptr);
    CHECK(nvshmem_align(8, 0) == nullptr);
    // A fresh block holds garbage, as NVSHMEM's heap does on a GPU: code that reads before it writes fails here.
    for (const uint8_t* block : {a, b, c}) CHECK(block[0] == ep_emu::kUninitializedByte && block[99] == block[0]);

    // Every PE got the same layout: each writes its offsets into row `me` of every PE's table.
    uint64_t* table = symmetric<uint64_t>(static_cast<size_t>(n) * 3);
    nvshmem_barrier_all();  // every table zeroed before any peer writes into it
    const uint64_t mine[3] = {static_cast<uint64_t>(b - a), static_cast<uint64_t>(c - a),
                              static_cast<uint64_t>(reinterpret_cast<uint8_t*>(table) - a)};
    for (int pe = 0; pe < n; ++pe) {
        auto* row = static_cast<uint64_t*>(nvshmem_ptr(table + 3 * me, pe));
        CHECK(row != nullptr);
        std::memcpy(row, mine, sizeof(mine));
    }
    nvshmem_barrier_all();
    for (int pe = 0; pe < n; ++pe) CHECK(std::memcmp(table + 3 * pe, mine, sizeof(mine)) == 0);

    int on_stack = 0;
    CHECK(nvshmem_ptr(a, me) == a);
    CHECK(nvshmem_ptr(&on_stack, 0) == nullptr);
    CHECK(nvshmem_ptr(a, n) == nullptr);
    CHECK(nvshmem_ptr(a, -1) == nullptr);

    // First fit reuses a freed range; freed neighbours merge (the large block needs them all).
    nvshmem_free(b);
    uint8_t* d = static_cast<uint8_t*>(nvshmem_align(4096, 2 * 4096));
    CHECK(d == b);
    for (void* block : {static_cast<void*>(a), static_cast<void*>(c), static_cast<void*>(d), static_cast<void*>(table)})
        nvshmem_free(block);
    CHECK(nvshmem_align(128, 1000) == a);
    void* large = nvshmem_align(128, size_t{60} << 20);
    CHECK(large != nullptr);
    nvshmem_free(large);
    nvshmem_free(a);
    expect_throw<ep::EPException>([&] { nvshmem_free(a); }, "freed already");
}

void puts_and_signals(int me, int n) {
    uint8_t* send = symmetric<uint8_t>(n * kRow);
    uint8_t* recv = symmetric<uint8_t>(n * kRow);
    uint8_t* recv_block = symmetric<uint8_t>(n * kRow);
    uint8_t* recv_plain = symmetric<uint8_t>(n * kRow);
    int* headers = symmetric<int>(2 * n);
    uint64_t* add_signals = symmetric<uint64_t>(n);
    uint64_t* set_signals = symmetric<uint64_t>(n);
    uint64_t* plain_signals = symmetric<uint64_t>(n);
    uint64_t* counter = symmetric<uint64_t>(1);
    for (int dst = 0; dst < n; ++dst)
        for (size_t i = 0; i < kRow; ++i) send[dst * kRow + i] = pattern(me, dst, i);
    nvshmem_barrier_all();  // every PE's buffers are zeroed before anyone puts

    constexpr uint64_t kEpoch = 7;
    // Block put + SET signal, back to back to every PE, from n blocks at once (they put the same bytes).
    kernel(
        [&] {
            for (int step = 0; step < n; ++step) {
                const int dst = (static_cast<int>(blockIdx.x) + step) % n;
                nvshmemx_putmem_signal_nbi_block(recv_block + me * kRow, send + dst * kRow, kRow, set_signals + me,
                                                 kEpoch, NVSHMEM_SIGNAL_SET, dst);
            }
        },
        static_cast<unsigned>(n));
    kernel([&] {
        const int tid = static_cast<int>(threadIdx.x);
        const int warp = tid / 32, lane = tid % 32;
        // Warp put + ADD signal, one warp per destination.
        for (int dst = warp; dst < n; dst += kThreads / 32)
            nvshmemx_putmem_signal_nbi_warp(recv + me * kRow, send + dst * kRow, kRow, add_signals + me, 1,
                                            NVSHMEM_SIGNAL_ADD, dst);
        // Warp put, header by int_p, quiet, then a separate signal: the low-latency path's order.
        for (int dst = warp; dst < n; dst += kThreads / 32) {
            nvshmemx_putmem_nbi_warp(recv_plain + me * kRow, send + dst * kRow, kRow, dst);
            if (lane == 0) {
                nvshmem_int_p(headers + 2 * me, 1000 + me, dst);
                nvshmem_int_p(headers + 2 * me + 1, 2000 + dst, dst);
                nvshmem_quiet();
                nvshmemx_signal_op(plain_signals + me, 1, NVSHMEM_SIGNAL_SET, dst);
            }
        }
        // Every thread adds 1 on every PE.
        for (int dst = 0; dst < n; ++dst) nvshmemx_signal_op(counter, 1, NVSHMEM_SIGNAL_ADD, dst);

        for (int src = tid; src < n; src += kThreads) {
            wait_at_least(add_signals + src, 1);
            wait_at_least(set_signals + src, kEpoch);
            wait_at_least(plain_signals + src, 1);
        }
        __syncthreads();
        for (int src = 0; src < n; ++src) {
            for (size_t i = static_cast<size_t>(tid); i < kRow; i += kThreads) {
                CHECK(recv[src * kRow + i] == pattern(src, me, i));
                CHECK(recv_block[src * kRow + i] == pattern(src, me, i));
                CHECK(recv_plain[src * kRow + i] == pattern(src, me, i));
            }
        }
        if (tid == 0) {
            for (int src = 0; src < n; ++src) {
                CHECK(add_signals[src] == 1);
                CHECK(set_signals[src] == kEpoch);
                CHECK(headers[2 * src] == 1000 + src);
                CHECK(headers[2 * src + 1] == 2000 + me);
            }
        }
    });
    nvshmem_barrier_all();  // every PE's adds have landed
    CHECK(*counter == static_cast<uint64_t>(n) * kThreads);

    // The barrier orders plain stores: round r's stores into peers are all visible after barrier r.
    int* slots = symmetric<int>(n);
    nvshmem_barrier_all();
    for (int round = 1; round <= 200; ++round) {
        for (int pe = 0; pe < n; ++pe) static_cast<int*>(nvshmem_ptr(slots + me, pe))[0] = round;
        nvshmem_barrier_all();
        for (int pe = 0; pe < n; ++pe) CHECK(slots[pe] == round);
        nvshmem_barrier_all();
    }
}

void exchange_scenario(const nvshmemx_uniqueid_t& id, int me, int n) {
    init(id, me, n);
    CHECK(nvshmem_my_pe() == me);
    CHECK(nvshmem_n_pes() == n);
    int major = 0, minor = 0, patch = 0;
    nvshmemx_vendor_get_version_info(&major, &minor, &patch);
    CHECK(major == 3 && minor == 8 && patch == 0);
    allocation(me, n);
    puts_and_signals(me, n);
    // A second init joins the first; only the last finalize tears down.
    init(id, me, n);
    nvshmem_finalize();
    CHECK(nvshmem_my_pe() == me);
    nvshmem_finalize();
    CHECK(nvshmem_my_pe() == -1);
}

// PE 0 and PE 1 in P2P domains of their own (DEEP_EP_PY_EMULATE_P2P_PES=1): PE 0's puts reach PE 1 late. Its rows
// read as 0xff after the signal is seen until PE 1's nvshmem_uint64_test holds (one that does not hold delivers
// nothing), and a row put with no signal is there after a barrier.
void late_network_writes_scenario(const nvshmemx_uniqueid_t& id, int me) {
    setenv("DEEP_EP_PY_EMULATE_P2P_PES", "1", 1);
    init(id, me, 2);
    uint8_t* send = symmetric<uint8_t>(2 * kRow);
    uint8_t* recv = symmetric<uint8_t>(2 * kRow);
    int* header = symmetric<int>(1);
    uint64_t* signal = symmetric<uint64_t>(1);
    uint64_t* ready = symmetric<uint64_t>(1);
    for (size_t i = 0; i < 2 * kRow; ++i) send[i] = pattern(me, 1, i);
    nvshmem_barrier_all();
    CHECK(nvshmem_ptr(recv, 1 - me) == nullptr);
    // A PE still leaving the barrier delivers the puts that reach it by then (it may: NVSHMEM promises visibility
    // after a barrier, not invisibility before one), so PE 0 puts only once PE 1 says it has left.
    if (me == 1) kernel([&] { if (threadIdx.x == 0) nvshmemx_signal_op(ready, 1, NVSHMEM_SIGNAL_SET, 0); });
    if (me == 0) {
        kernel([&] { if (threadIdx.x == 0) wait_at_least(ready, 1); });
        kernel([&] {
            nvshmemx_putmem_nbi_warp(recv, send, kRow, 1);
            if (threadIdx.x == 0) {
                nvshmem_int_p(header, 42, 1);
                nvshmem_quiet();
                nvshmemx_signal_op(signal, 1, NVSHMEM_SIGNAL_SET, 1);
            }
        });
        kernel([&] { nvshmemx_putmem_nbi_warp(recv + kRow, send + kRow, kRow, 1); });
    } else {
        kernel([&] {
            if (threadIdx.x != 0) return;
            wait_at_least(signal, 1);
            for (size_t i = 0; i < kRow; ++i) CHECK(recv[i] == 0xff);
            CHECK(*header == -1);
            CHECK(nvshmem_uint64_test(signal, NVSHMEM_CMP_GT, 1) == 0);
            CHECK(recv[0] == 0xff);
            CHECK(nvshmem_uint64_test(signal, NVSHMEM_CMP_EQ, 1) == 1);
            for (size_t i = 0; i < kRow; ++i) CHECK(recv[i] == pattern(0, 1, i));
            CHECK(*header == 42);
        });
    }
    nvshmem_barrier_all();
    if (me == 1)
        for (size_t i = 0; i < kRow; ++i) CHECK(recv[kRow + i] == pattern(0, 1, kRow + i));
    nvshmem_finalize();
}

// A PE starts a device-side fault inside a kernel; the process must abort.
void fault_scenario(const nvshmemx_uniqueid_t& id, const std::function<void(uint8_t* symmetric_bytes)>& body) {
    init(id, 0, 1);
    uint8_t* bytes = symmetric<uint8_t>(4096);
    kernel([&] { body(bytes); });
}

}  // namespace

int main() {
    setenv("NVSHMEM_SYMMETRIC_SIZE", "64M", 1);
    int failures = 0;
    const auto report = [&failures](const char* name, bool passed) {
        std::printf("%-60s %s\n", name, passed ? "ok" : "FAILED");
        std::fflush(stdout);
        if (!passed) ++failures;
    };

    {
        nvshmemx_uniqueid_t foreign = NVSHMEMX_UNIQUEID_INITIALIZER;
        foreign.version = 0;
        nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
        bool refused = false;
        try {
            nvshmemx_set_attr_uniqueid_args(0, 1, &foreign, &attr);
        } catch (const ep::EPException&) {
            refused = true;
        }
        report("unique id not made by the emulator is refused", refused);
    }
    {
        const nvshmemx_uniqueid_t id = new_unique_id();
        report("4 PEs: allocation, puts, signals, barriers, finalize",
               all_exited_zero(run_pes(kPes, [&](int pe) { exchange_scenario(id, pe, kPes); })));
    }
    {
        const nvshmemx_uniqueid_t id = new_unique_id();
        report("2 PEs, no P2P: a put is visible after a test or barrier",
               all_exited_zero(run_pes(2, [&](int pe) { late_network_writes_scenario(id, pe); })));
    }
    {
        const nvshmemx_uniqueid_t id = new_unique_id();
        report("1 PE: init, alloc, finalize, then an init is refused", all_exited_zero(run_pes(1, [&](int) {
                   init(id, 0, 1);
                   CHECK(nvshmem_align(64, 64) != nullptr);
                   nvshmem_finalize();
                   expect_throw<ep::EPException>([] { init(new_unique_id(), 0, 1); }, "cannot restart");
                   CHECK(nvshmem_my_pe() == -1);
               })));
    }
    {
        const nvshmemx_uniqueid_t id = new_unique_id();
        report("init: 2 of 3 PEs come, timeout names PE 2", all_exited_zero(run_pes(2, [&](int pe) {
                   setenv("DEEP_EP_PY_TIMEOUT_S", "0.5", 1);
                   expect_throw<ep::EPTimeoutException>([&] { init(id, pe, 3); }, "for PEs 2 to join");
                   CHECK(nvshmem_my_pe() == -1);
               })));
    }
    {
        const nvshmemx_uniqueid_t id = new_unique_id();
        report("barrier: PE 1 leaves after init, PE 0's barrier names it", all_exited_zero(run_pes(2, [&](int pe) {
                   setenv("DEEP_EP_PY_TIMEOUT_S", "0.5", 1);
                   init(id, pe, 2);
                   if (pe == 1) return;
                   expect_throw<ep::EPTimeoutException>([] { nvshmem_barrier_all(); }, "for PEs 1 (");
                   expect_throw<ep::EPTimeoutException>([] { nvshmem_finalize(); }, "nvshmem_finalize");
                   CHECK(nvshmem_my_pe() == -1);
               })));
    }
    {
        const nvshmemx_uniqueid_t id = new_unique_id();
        report("NVSHMEM_SYMMETRIC_SIZE=12X is refused", all_exited_zero(run_pes(1, [&](int) {
                   setenv("NVSHMEM_SYMMETRIC_SIZE", "12X", 1);
                   expect_throw<ep::EPException>([&] { init(id, 0, 1); }, "NVSHMEM_SYMMETRIC_SIZE='12X'");
               })));
    }
    std::printf("(the next three abort on purpose; their message is expected)\n");
    std::fflush(stdout);
    {
        const nvshmemx_uniqueid_t id = new_unique_id();
        report("device fault: put from a non-symmetric source aborts", all_aborted(run_pes(1, [&](int) {
                   fault_scenario(id, [](uint8_t* bytes) {
                       static uint8_t private_bytes[64];
                       nvshmemx_putmem_nbi_warp(bytes, private_bytes, sizeof(private_bytes), 0);
                   });
               })));
    }
    {
        const nvshmemx_uniqueid_t id = new_unique_id();
        report("device fault: lanes of a warp put differ aborts", all_aborted(run_pes(1, [&](int) {
                   fault_scenario(id, [](uint8_t* bytes) {
                       nvshmemx_putmem_nbi_warp(bytes + 64 * (threadIdx.x % 2), bytes + 2048, 64, 0);
                   });
               })));
    }
    {
        const nvshmemx_uniqueid_t id = new_unique_id();
        report("device fault: signal to an out-of-range PE aborts", all_aborted(run_pes(1, [&](int) {
                   fault_scenario(id, [](uint8_t* bytes) {
                       nvshmemx_signal_op(reinterpret_cast<uint64_t*>(bytes), 1, NVSHMEM_SIGNAL_SET, 1);
                   });
               })));
    }
    report("no rendezvous file left in /dev/shm", leftover_rendezvous_files() == 0);

    std::printf("%s\n", failures == 0 ? "ALL PASSED" : "SOME FAILED");
    return failures == 0 ? 0 : 1;
}
