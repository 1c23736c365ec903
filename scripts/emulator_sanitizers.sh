#!/usr/bin/env bash
# The GPU tier of the tests on the CPU emulator, with AddressSanitizer and UndefinedBehaviorSanitizer compiled into
# the kernels. An index past a tensor or a buffer, and a misaligned vector access (a fault on a GPU; x86 forgives
# it), then stop the rank with the kernel's line. Without them the emulator may read a neighbour's bytes and pass.
#
# Usage: scripts/emulator_sanitizers.sh [pytest arguments]          (default: tests/gpu)
#   SANITIZER_WORK_DIR   where the build, the copy of the sources and the reports go (default: a new temp dir)
#   DEEP_EP_PY_GPU_TEST_RANKS   the rank counts, as for the GPU tier (default here: 2)
#
# Needs what the emulator's build needs (a C++ compiler, cmake, ninja, pybind11, the CUDA toolkit headers, NVSHMEM's
# headers) and the compiler's libasan and libubsan. Without those two runtimes it says so and exits 0: skipped.
# The checkout's own build is left alone: the sanitized emulator goes beside a copy of the sources.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cxx=${CXX:-g++}
asan=$("$cxx" -print-file-name=libasan.so 2>/dev/null || true)
ubsan=$("$cxx" -print-file-name=libubsan.so 2>/dev/null || true)
# -print-file-name echoes a bare name back when it finds no such file.
if [ ! -e "$asan" ] || [ ! -e "$ubsan" ]; then
    echo "emulator_sanitizers: $cxx has no libasan.so and libubsan.so: skipped"
    exit 0
fi

work=${SANITIZER_WORK_DIR:-$(mktemp -d)}
mkdir -p "$work"
sanitize="-fsanitize=address,undefined"
# vptr needs RTTI across pybind11's and torch's libraries, which are not instrumented.
flags="$sanitize -fno-sanitize=vptr -fno-omit-frame-pointer"
echo "emulator_sanitizers: building the emulator with $flags in $work/build"
if ! cmake -S "$root" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="$flags" \
    -DCMAKE_MODULE_LINKER_FLAGS="$sanitize" -DPython_EXECUTABLE="$(command -v python)" \
    -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" >"$work/configure.log" 2>&1; then
    tail -n 30 "$work/configure.log"
    echo "emulator_sanitizers: cmake configure failed (log above)"
    exit 1
fi
cmake --build "$work/build" --target _C_emu -j"$(nproc)" >"$work/build.log" 2>&1 || {
    tail -n 30 "$work/build.log"
    echo "emulator_sanitizers: the sanitized emulator did not build (log above)"
    exit 1
}

tree="$work/tree"
rm -rf "$tree"
mkdir -p "$tree"
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -cf - -T -) | tar -xf - -C "$tree"
else
    cp -r "$root/deep_ep_py" "$root/tests" "$root/bench" "$tree/"
    rm -f "$tree"/deep_ep_py/_C*.so
fi
cp "$work/build"/_C_emu*.so "$tree/deep_ep_py/"

reports="$work/reports"
rm -rf "$reports"
mkdir -p "$reports"
status=0
# The sanitizer runtimes must come first in a process whose interpreter is not instrumented. ASan stops a process
# at its first report; UBSan is told to as well. Leak checking is off: torch and Python keep memory until exit.
(
    cd "$tree"
    export LD_PRELOAD="$asan $ubsan"
    export ASAN_OPTIONS="detect_leaks=0:log_path=$reports/asan"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan"
    export DEEP_EP_PY_GPU_TEST_RANKS="${DEEP_EP_PY_GPU_TEST_RANKS:-2}"
    python -m pytest -q -p no:cacheprovider "${@:-tests/gpu}"
) || status=$?

# Each process writes its own report file; ASan also notes there each fiber's stack switch, which is no error.
found=$(grep -l -E "ERROR: AddressSanitizer|runtime error:" "$reports"/* 2>/dev/null || true)
if [ -n "$found" ]; then
    for report in $found; do
        echo "---- $report"
        grep -v -E "ignoring requested __asan_handle_no_return|False positive error reports may follow|issues/189" \
            "$report" | head -n 60
    done
    echo "emulator_sanitizers: sanitizer reports above"
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "emulator_sanitizers: pytest failed (rc $status) with no sanitizer report"
    exit "$status"
fi
echo "emulator_sanitizers: passed with no sanitizer report (reports in $reports)"
