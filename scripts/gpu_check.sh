#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with a GPU (see the GPU rig notes): versions, MPS up, an in-place
# build for sm_90 with all cores, the GPU test tier at the given rank counts, the benchmark, then the internode
# (hierarchical) path with the ranks playing several nodes (its tests, and its benchmark rows next to the intranode
# rows on the same data), MPS down, and a summary table printed last. Every step logs to its own file in the log
# directory and is timed; a failed step does not stop the others; the exit status is non-zero when any step failed.
# The tests run one step per rank count, the broadest first: the tests at --ranks' first count (every path but
# internode), the benchmark at --ranks' last count (where the targets are set, and the one that sizes SMs and memory
# for the most ranks), the internode tests at --internode-ranks' first, then the other benchmark counts, the other
# test counts, and the internode benchmark. So under --budget a short lease still covers every path once, with
# figures, before it spends time on more rank counts; there the benchmark and internode test steps also get limits
# of their own (BENCH_STEP_S, INTERNODE_TEST_STEP_S), so that one hang cannot take what the later steps need.
#
#   scripts/gpu_check.sh [--log-dir DIR] [--ranks "2 4 8"] [--internode-ranks "4 8"] [--quick] [--wheel-dir DIR]
#                        [--skip STEP[,STEP]] [--tests-k EXPR] [--step-timeout SECONDS] [--budget SECONDS]
#                        [--archive FILE] [--device cuda|emulated]
#
#   --log-dir DIR         logs, bench.json, bench_internode.json, summary.txt (env GPU_CHECK_LOG_DIR; default
#                         ./gpu_check_logs)
#   --ranks "2 4 8"       rank counts for the GPU tests and the benchmark, all ranks on the GPU(s) there are
#   --internode-ranks "4 8"
#                         rank counts for the internode tests and benchmark rows (steps of their own), played as
#                         2 nodes (in the tests also as 4 and 8 nodes where those divide them)
#   --quick               the benchmark's small sizes
#   --wheel-dir DIR       pip-install the wheels in DIR first (e.g. the carried nvshmem4py wheel), offline
#   --skip STEPS          steps to skip, comma-separated (a test step of every rank count by its name):
#                         info,mps,wheel,build,ext,tests,bench,tests_internode,bench_internode
#   --tests-k EXPR        only the GPU tests pytest -k EXPR selects (both test steps), e.g. "intranode" or
#                         "layout or runtime"
#   --step-timeout S      wall-clock limit of each step (default 1200); a step past it gets SIGINT (pytest still
#                         prints its failures and writes its XML), is killed 15 s later, and FAILs
#   --budget S            wall-clock limit of the whole run (env GPU_CHECK_BUDGET_S; default none): each step gets
#                         at most what is left of it, less the time the closing steps need; a step that would get
#                         under 20 s is not started (SKIP, "budget"). For a lent GPU's 10-minute command: 540
#   --archive FILE        also pack the log directory into FILE (.tar.gz), anew after every step (with a partial
#                         summary.txt) and at the end, and copy summary.txt next to it: where only a few files may
#                         come back from the machine (e.g. $OUT/gpu_check.tar.gz), and a killed command too
#   --device emulated     a dry run of every step without a GPU: the CPU emulator of the kernels builds in place,
#                         the GPU tier runs on it, the benchmark at tiny sizes (figures meaningless), no MPS; so
#                         that the script itself is known to work before a GPU's short lease is spent on it
#
# Environment: PYTHON (default python3), CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY (default /tmp/mps_pipe,
# /tmp/mps_log), DEEP_EP_PY_TIMEOUT_S (device wait timeout; default here 10 s once MPS is up, else 30),
# DEEP_EP_PY_TEST_TIMEOUT_S (a test launch's; 120 under --budget on a GPU), GPU_CHECK_BUILD_DIR (default build),
# GPU_CHECK_COMMIT (the commit to report where the copy has no .git), GPU_CHECK_BENCH_STEP_S /
# GPU_CHECK_INTERNODE_TEST_STEP_S (those steps' limits under --budget; default 150, 180),
# DEEP_EP_PY_TRAP_ON_DEVICE_ERROR (default here never: a trap under MPS would end every rank).
# Nothing is downloaded: the machine's own torch and NVSHMEM are used.

# The step functions run through run_step, traps and `bash -c` (exported): shellcheck cannot see those calls.
# shellcheck disable=SC2317,SC2329

set -u
set -o pipefail

ORIGINAL_PWD=$(pwd)
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

LOG_DIR=${GPU_CHECK_LOG_DIR:-./gpu_check_logs}
RANKS="2 4 8"
INTERNODE_RANKS="4 8"
QUICK=0
WHEEL_DIR=""
SKIP_STEPS=""
TESTS_K=""
STEP_TIMEOUT_S=1200
BUDGET_S=${GPU_CHECK_BUDGET_S:-0}
ARCHIVE=""
DEVICE=cuda
PYTHON=${PYTHON:-python3}
BUILD_DIR=${GPU_CHECK_BUILD_DIR:-build}

usage() {
    # The header comment, up to the first line that is not one.
    awk 'NR > 1 && !/^#/ { exit } NR > 1' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

need_value() {
    if [ "$#" -lt 2 ] || [ -z "$2" ]; then
        echo "gpu_check: $1 needs a value" >&2
        exit 2
    fi
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        --log-dir) need_value "$@"; LOG_DIR=$2; shift 2 ;;
        --log-dir=*) LOG_DIR=${1#*=}; shift ;;
        --ranks) need_value "$@"; RANKS=$2; shift 2 ;;
        --ranks=*) RANKS=${1#*=}; shift ;;
        --internode-ranks) need_value "$@"; INTERNODE_RANKS=$2; shift 2 ;;
        --internode-ranks=*) INTERNODE_RANKS=${1#*=}; shift ;;
        --quick) QUICK=1; shift ;;
        --wheel-dir) need_value "$@"; WHEEL_DIR=$2; shift 2 ;;
        --wheel-dir=*) WHEEL_DIR=${1#*=}; shift ;;
        --skip) need_value "$@"; SKIP_STEPS=$2; shift 2 ;;
        --skip=*) SKIP_STEPS=${1#*=}; shift ;;
        --tests-k) need_value "$@"; TESTS_K=$2; shift 2 ;;
        --tests-k=*) TESTS_K=${1#*=}; shift ;;
        --step-timeout) need_value "$@"; STEP_TIMEOUT_S=$2; shift 2 ;;
        --step-timeout=*) STEP_TIMEOUT_S=${1#*=}; shift ;;
        --budget) need_value "$@"; BUDGET_S=$2; shift 2 ;;
        --budget=*) BUDGET_S=${1#*=}; shift ;;
        --archive) need_value "$@"; ARCHIVE=$2; shift 2 ;;
        --archive=*) ARCHIVE=${1#*=}; shift ;;
        --device) need_value "$@"; DEVICE=$2; shift 2 ;;
        --device=*) DEVICE=${1#*=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

# check_rank_counts OPTION VALUE: prints the value as space-separated positive integers, or exits 2 with a message.
check_rank_counts() {
    local counts count
    counts=$(echo "$2" | tr ',' ' ' | xargs)
    for count in $counts; do
        case "$count" in
            '' | *[!0-9]* | 0) echo "gpu_check: $1 expects positive integers, got '$2'" >&2; exit 2 ;;
        esac
    done
    if [ -z "$counts" ]; then
        echo "gpu_check: $1 is empty" >&2
        exit 2
    fi
    echo "$counts"
}
RANKS=$(check_rank_counts --ranks "$RANKS") || exit 2
INTERNODE_RANKS=$(check_rank_counts --internode-ranks "$INTERNODE_RANKS") || exit 2
case "$STEP_TIMEOUT_S" in
    '' | *[!0-9]* | 0) echo "gpu_check: --step-timeout expects a positive integer, got '$STEP_TIMEOUT_S'" >&2; exit 2 ;;
esac
case "$DEVICE" in
    cuda | emulated) ;;
    *) echo "gpu_check: --device expects cuda or emulated, got '$DEVICE'" >&2; exit 2 ;;
esac
case "$BUDGET_S" in
    '' | *[!0-9]*) echo "gpu_check: --budget expects a whole number of seconds (0: none), got '$BUDGET_S'" >&2; exit 2 ;;
esac

absolute() {
    case "$1" in
        /*) echo "$1" ;;
        *) echo "$ORIGINAL_PWD/$1" ;;
    esac
}
LOG_DIR=$(absolute "$LOG_DIR")
[ -n "$WHEEL_DIR" ] && WHEEL_DIR=$(absolute "$WHEEL_DIR")
[ -n "$ARCHIVE" ] && ARCHIVE=$(absolute "$ARCHIVE")
STEP_KINDS="info mps wheel build ext tests bench tests_internode bench_internode"
for kind in $(echo "$SKIP_STEPS" | tr ',' ' '); do
    case " $STEP_KINDS " in
        *" $kind "*) ;;
        *) echo "gpu_check: --skip expects step kinds among '$STEP_KINDS' (comma-separated), got '$kind'" >&2; exit 2 ;;
    esac
done
if ! mkdir -p "$LOG_DIR"; then
    echo "gpu_check: cannot create the log directory $LOG_DIR" >&2
    exit 2
fi
# What an earlier run left there would pass for this one's (figures of a step that failed now, logs in the archive).
rm -f "$LOG_DIR"/[0-9][0-9]_*.log "$LOG_DIR"/bench_*.json "$LOG_DIR"/pytest_*.xml "$LOG_DIR"/summary.txt* \
    "$LOG_DIR"/figures.txt
rm -rf "$LOG_DIR/mps"
# Nor an earlier archive: a run killed before its first step ends leaves none rather than an old one.
[ -n "$ARCHIVE" ] && rm -f "$ARCHIVE" "$ARCHIVE.tmp"
cd "$REPO_DIR" || exit 2
# Which commit runs: a copy of the tree without .git (a lent machine's) says so only through GPU_CHECK_COMMIT.
COMMIT=${GPU_CHECK_COMMIT:-$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null)}
COMMIT=${COMMIT:-unknown (no .git, no GPU_CHECK_COMMIT)}

export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/mps_pipe}
export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/mps_log}
# The device wait timeout: 30 s until MPS is known to be up (then 10 s, below), unless set here.
USER_DEVICE_TIMEOUT_S=${DEEP_EP_PY_TIMEOUT_S:-}
export DEEP_EP_PY_TIMEOUT_S=${DEEP_EP_PY_TIMEOUT_S:-30}
# Eager module loading: with lazy loading, the first launch of a kernel can stall the host while this rank's
# barrier kernel already waits on its peers, which skews first-call timings and short timeout tests.
export CUDA_MODULE_LOADING=${CUDA_MODULE_LOADING:-EAGER}
export PYTHONUNBUFFERED=1
# Each of up to 8 ranks and the pytest process would take one torch intra-op thread per core; their host work is
# small, and 2 each leaves the cores to the ranks' polling host loops.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# No core dumps: an abort under NVSHMEM's large mappings could fill the machine's disk.
ulimit -c 0
# Under a budget, one launch that hangs on the host costs the suite's launch timeout (default 180 s) out of its
# step's time: on a GPU a launch takes seconds, and 120 s leaves the step time for the tests after it.
if [ "$BUDGET_S" -gt 0 ] && [ "$DEVICE" = cuda ]; then
    export DEEP_EP_PY_TEST_TIMEOUT_S=${DEEP_EP_PY_TEST_TIMEOUT_S:-120}
fi
# A kernel that records an error in a launch captured into a CUDA graph traps by default, and under MPS a trap ends
# every process on the GPU: one failing graph case would cost every test after it in its step ("an earlier case broke
# the CUDA context") and the benchmark its rows. Here the record is enough (the tests check it after every replay);
# the trap itself is tested where a test asks for it (test_trap_gpu, test_runtime_gpu).
export DEEP_EP_PY_TRAP_ON_DEVICE_ERROR=${DEEP_EP_PY_TRAP_ON_DEVICE_ERROR:-never}
# nvcc: on PATH, else in CUDA_HOME's bin, else where the toolkit installs itself (a bare machine may well have it
# there only). CMake looks only at PATH, CUDACXX and CUDA_PATH, and without nvcc builds nothing but a warning.
if ! command -v nvcc >/dev/null 2>&1; then
    for cuda_bin in ${CUDA_HOME:+"$CUDA_HOME/bin"} /usr/local/cuda/bin; do
        if [ -x "$cuda_bin/nvcc" ]; then
            export PATH="$cuda_bin:$PATH"
            break
        fi
    done
fi

# ---- step bookkeeping -------------------------------------------------------------------------------------------

STEP_NAMES=()
STEP_STATUS=()
STEP_SECONDS=()
STEP_DETAILS=()
STEP_COUNT=0
MPS_STARTED=0
SUMMARY_PRINTED=0
STEP_PID=""
CURRENT_STEP=""
STEP_STARTED=0
LAST_LOG=""
LAST_RC=0

# A step of one rank count is named for its kind and the count (tests_r2, tests_internode_r4); --skip names kinds.
is_skipped() {
    case ",$SKIP_STEPS," in
        *",${1%_r[0-9]*},"*) return 0 ;;
        *) return 1 ;;
    esac
}

# Set once the build or the extension check failed: every later step that needs the extension is then recorded as
# skipped, not run. On a GPU its tests would fail one by one (DEEP_EP_PY_EXPECT_GPU), and the benchmark would time
# the reference fallback over gloo until the step's limit: together the budget a fix and a second run need.
NO_EXTENSION=""
needs_extension() {
    case "$1" in
        ext | tests_* | bench_*) return 0 ;;
        *) return 1 ;;
    esac
}

# What a budgeted run keeps back for its closing steps, and the least time worth starting a step with: one GPU test
# launch (N processes importing torch, NVSHMEM up) takes about that. The reserve covers a step killed at its limit
# (15 s of --kill-after past it), MPS down (up to 30 s, usually 1) and the figures' report (REPORT_TIMEOUT_S).
CLOSING_RESERVE_S=45
REPORT_TIMEOUT_S=20
MIN_STEP_S=20
TOTAL_STARTED=$SECONDS

budget_left() {
    echo $((BUDGET_S - (SECONDS - TOTAL_STARTED) - CLOSING_RESERVE_S))
}

record() {  # name status seconds details
    STEP_NAMES+=("$1")
    STEP_STATUS+=("$2")
    STEP_SECONDS+=("$3")
    STEP_DETAILS+=("$4")
}

# run_step NAME LIMIT_S COMMAND...: runs COMMAND with its output in LOG_DIR/NN_NAME.log. LIMIT_S > 0 runs it under
# timeout (in its own process group: a timed-out step's children die with it); 0 runs it in this shell (for steps
# that export variables), without a limit. Sets LAST_LOG and LAST_RC.
run_step() {
    local name=$1 limit=$2
    shift 2
    STEP_COUNT=$((STEP_COUNT + 1))
    LAST_LOG=$(printf '%s/%02d_%s.log' "$LOG_DIR" "$STEP_COUNT" "$name")
    LAST_RC=0
    if is_skipped "$name"; then
        record "$name" SKIP 0 "--skip"
        echo "== [$name] skipped (--skip)"
        return 0
    fi
    if [ -n "$NO_EXTENSION" ] && needs_extension "$name"; then
        record "$name" SKIP 0 "no extension ($NO_EXTENSION)"
        echo "== [$name] skipped: no extension ($NO_EXTENSION)"
        return 0
    fi
    local cut_by_budget=0
    if [ "$limit" -gt 0 ] && [ "$BUDGET_S" -gt 0 ]; then
        local left
        left=$(budget_left)
        if [ "$left" -lt "$MIN_STEP_S" ]; then
            record "$name" SKIP 0 "budget: $((left > 0 ? left : 0)) s of --budget $BUDGET_S left"
            echo "== [$name] not started: $((left > 0 ? left : 0)) s of the budget left"
            return 0
        fi
        if [ "$left" -lt "$limit" ]; then
            limit=$left
            cut_by_budget=1
        fi
    fi
    echo "== [$name] $(date +%H:%M:%S) log: $LAST_LOG"
    printf '$ %s\n' "$*" >"$LAST_LOG"
    CURRENT_STEP=$name
    STEP_STARTED=$SECONDS
    local started=$SECONDS
    if [ "$limit" -gt 0 ]; then
        # In the background and waited for, so that a signal to this script runs its trap at once. SIGINT, not
        # timeout's SIGTERM: pytest writes its failures, its -rfEs lines, the GPU batches' timings and its junit XML
        # only at the session's end, which a KeyboardInterrupt reaches and a SIGTERM does not. (timeout installs its
        # own SIGINT handler, so the step gets SIGINT's default disposition although a background job of a script
        # starts with it ignored.) What does not end within 15 s of the signal is killed.
        timeout --signal=INT --kill-after=15 "$limit" "$@" >>"$LAST_LOG" 2>&1 &
        STEP_PID=$!
        wait "$STEP_PID"
        LAST_RC=$?
        STEP_PID=""
    else
        "$@" >>"$LAST_LOG" 2>&1
        LAST_RC=$?
    fi
    local elapsed=$((SECONDS - started))
    local details=""
    if [ "$LAST_RC" -eq 124 ] || [ "$LAST_RC" -eq 137 ]; then
        details="timed out after ${limit} s"
        [ "$cut_by_budget" -eq 1 ] && details="$details (what was left of --budget $BUDGET_S)"
    elif [ "$LAST_RC" -ne 0 ]; then
        details="exit code $LAST_RC"
    fi
    if [ "$LAST_RC" -eq 0 ]; then
        record "$name" PASS "$elapsed" "$details"
    else
        record "$name" FAIL "$elapsed" "$details"
        echo "   [$name] FAILED ($details) after ${elapsed} s; last lines of $LAST_LOG:"
        tail -n 30 "$LAST_LOG" | sed 's/^/   | /'
    fi
    checkpoint
    return 0
}

# Append to the details of the last recorded step.
add_details() {
    local last=$((${#STEP_NAMES[@]} - 1))
    if [ -n "${STEP_DETAILS[$last]}" ]; then
        STEP_DETAILS[last]="${STEP_DETAILS[$last]}; $1"
    else
        STEP_DETAILS[last]="$1"
    fi
    checkpoint
}

count_failed() {
    local num_failed=0 status
    for status in "${STEP_STATUS[@]}"; do
        [ "$status" = FAIL ] && num_failed=$((num_failed + 1))
    done
    echo "$num_failed"
}

# format_summary NUM_FAILED [partial]: the table; "partial" for one written while the run still goes on.
format_summary() {
    local num_failed=$1 partial=${2:-} i num_not_started=0 not_started=""
    echo "==================== gpu_check summary ===================="
    printf '%-20s %-6s %8s  %s\n' step status seconds details
    for i in "${!STEP_NAMES[@]}"; do
        printf '%-20s %-6s %8s  %s\n' "${STEP_NAMES[$i]}" "${STEP_STATUS[$i]}" "${STEP_SECONDS[$i]}" "${STEP_DETAILS[$i]}"
        case "${STEP_DETAILS[$i]}" in
            budget:*) num_not_started=$((num_not_started + 1)) ;;
        esac
    done
    [ "$num_not_started" -gt 0 ] && not_started=", $num_not_started not started for the budget"
    if [ -n "$partial" ]; then
        echo "overall: RUNNING (partial: written after step ${STEP_NAMES[$((${#STEP_NAMES[@]} - 1))]} at" \
            "$((SECONDS - TOTAL_STARTED)) s; $num_failed of ${#STEP_NAMES[@]} steps failed so far$not_started);" \
            "logs in $LOG_DIR"
    elif [ "$num_failed" -eq 0 ]; then
        echo "overall: PASS (${#STEP_NAMES[@]} steps$not_started, ranks: $RANKS, internode: $INTERNODE_RANKS);" \
            "logs in $LOG_DIR"
    else
        echo "overall: FAIL ($num_failed of ${#STEP_NAMES[@]} steps failed$not_started, ranks: $RANKS, internode:" \
            "$INTERNODE_RANKS); logs in $LOG_DIR"
    fi
    echo "commit: $COMMIT"
}

# The figures of every benchmark step that finished, in one table (also into LOG_DIR/figures.txt): what a reader of
# the last lines of the output wants next to the steps' outcomes.
print_figures() {
    local files=()
    local file
    # In the order they ran: the benchmark's rank counts, then the internode benchmark's.
    for file in "$LOG_DIR"/bench_r*.json "$LOG_DIR"/bench_internode_r*.json; do
        [ -f "$file" ] && files+=("$file")
    done
    [ "${#files[@]}" -gt 0 ] || return 0
    echo
    echo "==================== gpu_check figures ===================="
    (cd "$REPO_DIR" && timeout "$REPORT_TIMEOUT_S" "$PYTHON" -m bench.report "${files[@]}") 2>&1 |
        tee "$LOG_DIR/figures.txt"
}

# Prints the figures and the summary (also into LOG_DIR/summary.txt); returns the number of failed steps.
print_summary() {
    SUMMARY_PRINTED=1
    local num_failed
    num_failed=$(count_failed)
    print_figures
    echo
    format_summary "$num_failed" | tee "$LOG_DIR/summary.txt"
    return "$num_failed"
}

# write_archive [quiet]: packs the log directory into ARCHIVE and copies summary.txt next to it (readable without
# unpacking), each through a temporary file and a rename, so that a command killed meanwhile leaves the last
# complete archive, never a truncated one.
write_archive() {
    [ -n "$ARCHIVE" ] || return 0
    local archive_dir
    archive_dir=$(dirname "$ARCHIVE")
    if mkdir -p "$archive_dir" &&
        tar -czf "$ARCHIVE.tmp" -C "$(dirname "$LOG_DIR")" "$(basename "$LOG_DIR")" && mv -f "$ARCHIVE.tmp" "$ARCHIVE"
    then
        [ "${1:-}" = quiet ] || echo "gpu_check: logs packed into $ARCHIVE"
    else
        rm -f "$ARCHIVE.tmp"
        echo "gpu_check: could not pack the logs into $ARCHIVE" >&2
    fi
    if [ -f "$LOG_DIR/summary.txt" ] && ! [ "$archive_dir" -ef "$LOG_DIR" ]; then
        cp -f "$LOG_DIR/summary.txt" "$archive_dir/summary.txt.tmp" &&
            mv -f "$archive_dir/summary.txt.tmp" "$archive_dir/summary.txt"
    fi
}

# The MPS daemon's logs (the server's names the clients that faulted) into LOG_DIR/mps, their last MiB each (a
# daemon that was already running may have logged for long).
copy_mps_logs() {
    local log
    for log in "$CUDA_MPS_LOG_DIRECTORY"/*.log; do
        [ -f "$log" ] || continue
        mkdir -p "$LOG_DIR/mps" && tail -c 1048576 "$log" >"$LOG_DIR/mps/$(basename "$log")"
    done
}

# After every step: a partial summary and a fresh archive, so that a command killed before the end (a lent
# machine's limit, a hang past every timeout) still returns every finished step's log and outcome. The logs are
# small: this takes well under a second.
checkpoint() {
    format_summary "$(count_failed)" partial >"$LOG_DIR/summary.txt.tmp" &&
        mv -f "$LOG_DIR/summary.txt.tmp" "$LOG_DIR/summary.txt"
    copy_mps_logs
    write_archive quiet
}

# ---- steps ------------------------------------------------------------------------------------------------------

mps_control_answers() {
    echo get_server_list | timeout 10 nvidia-cuda-mps-control >/dev/null 2>&1
}

stop_mps() {
    if [ "$MPS_STARTED" -eq 1 ]; then
        MPS_STARTED=0
        echo quit | timeout 30 nvidia-cuda-mps-control
    fi
}

on_exit() {
    # Normal runs stopped MPS as a step already; this catches an early exit.
    stop_mps >/dev/null 2>&1
}

on_signal() {
    echo "gpu_check: interrupted" >&2
    if [ -n "$STEP_PID" ]; then
        # timeout passes the signal on to the step's whole process group; SIGINT for the reason in run_step.
        kill -INT "$STEP_PID" 2>/dev/null
        wait "$STEP_PID" 2>/dev/null
        record "$CURRENT_STEP" FAIL "$((SECONDS - STEP_STARTED))" "interrupted"
    fi
    stop_mps >/dev/null 2>&1
    [ "$SUMMARY_PRINTED" -eq 1 ] || print_summary
    copy_mps_logs
    write_archive
    exit 130
}
trap on_exit EXIT
trap on_signal INT TERM

step_info() {
    local rc=0
    echo "date: $(date -Is)  host: $(hostname)  repo: $REPO_DIR"
    [ -n "${GPU_CHECK_COMMIT:-}" ] && echo "commit: $GPU_CHECK_COMMIT (GPU_CHECK_COMMIT)"
    (git -C "$REPO_DIR" log -1 --oneline && git -C "$REPO_DIR" status --short) 2>/dev/null || echo "(not a git checkout)"
    echo
    if [ "$DEVICE" = cuda ]; then
        timeout 60 nvidia-smi || rc=1
        echo
        timeout 60 nvidia-smi topo -m 2>/dev/null
        echo
        # EXCLUSIVE_PROCESS would refuse the trap test's child, which runs outside MPS next to the daemon.
        timeout 60 nvidia-smi --query-gpu=index,name,compute_mode --format=csv
    else
        echo "--device emulated: the kernels run on their CPU emulator ($(nproc) cores)"
    fi
    echo
    echo "nvcc: $(command -v nvcc || echo 'not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)')  CUDA_HOME=${CUDA_HOME:-}"
    nvcc --version
    # NVSHMEM's several PEs per GPU (under MPS) set up through POSIX shared memory.
    df -h /dev/shm /tmp 2>/dev/null
    echo "OMP_NUM_THREADS=$OMP_NUM_THREADS CUDA_MODULE_LOADING=$CUDA_MODULE_LOADING" \
        "DEEP_EP_PY_TEST_TIMEOUT_S=${DEEP_EP_PY_TEST_TIMEOUT_S:-} (the device wait timeout is set by the mps step)"
    cmake --version | head -n 1 || rc=1
    ninja --version 2>/dev/null | sed 's/^/ninja /'
    "$PYTHON" - <<'EOF' || rc=1
import platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("torch.cuda.is_available()", torch.cuda.is_available(), "device_count", torch.cuda.device_count())
for index in range(torch.cuda.device_count()):
    print("device", index, torch.cuda.get_device_name(index))
EOF
    "$PYTHON" -m pip list 2>/dev/null | grep -iE '^(torch|nvidia-nvshmem|nvshmem|cuda|pybind11|pytest|scikit-build)' || true
    return "$rc"
}

step_mps() {
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY" || return 1
    if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
        echo "nvidia-cuda-mps-control is not on PATH: ranks sharing a GPU would run time-sliced"
        return 1
    fi
    if mps_control_answers; then
        echo "an MPS daemon already answers at $CUDA_MPS_PIPE_DIRECTORY: using it, leaving it running"
        return 0
    fi
    nvidia-cuda-mps-control -d || return 1
    MPS_STARTED=1
    # By the clock: each probe may itself wait up to its own timeout.
    local deadline=$((SECONDS + 10))
    until mps_control_answers; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "the MPS daemon did not answer within 10 s; its log:"
            cat "$CUDA_MPS_LOG_DIRECTORY/control.log" 2>/dev/null
            return 1
        fi
        sleep 0.5
    done
    echo "MPS daemon started: CUDA_MPS_PIPE_DIRECTORY=$CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY=$CUDA_MPS_LOG_DIRECTORY"
}

step_wheel() {
    local wheels=("$WHEEL_DIR"/*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        echo "no .whl files in $WHEEL_DIR"
        return 1
    fi
    "$PYTHON" -m pip install --no-deps --no-index "${wheels[@]}"
}

step_build() {
    local generator=() cache="$BUILD_DIR/CMakeCache.txt"
    command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
    # CMake refuses a build directory configured with another generator or for a source tree elsewhere (one copied
    # along with the tree): start its configuration over.
    if [ -f "$cache" ] && { ! grep -qxF "CMAKE_HOME_DIRECTORY:INTERNAL=$REPO_DIR" "$cache" ||
        { [ "${#generator[@]}" -gt 0 ] && ! grep -qxF 'CMAKE_GENERATOR:INTERNAL=Ninja' "$cache"; }; }; then
        echo "gpu_check: $BUILD_DIR was configured for another source tree or generator; configuring it anew"
        rm -rf "$cache" "$BUILD_DIR/CMakeFiles"
    fi
    local python_path
    python_path=$(command -v "$PYTHON") || { echo "$PYTHON not found"; return 1; }
    # Release, as a pip install builds it (pyproject.toml): the benchmark times this build. On a GPU no CPU
    # emulator (the tests run on the GPU, DEEP_EP_PY_EXPECT_GPU=1, and device time is short); emulated, only it.
    local emulator=OFF targets=() module=_C
    if [ "$DEVICE" = emulated ]; then
        emulator=ON
        targets=(--target _C_emu)
        module=_C_emu
    fi
    # The emulator needs nvcc too (the CUDA headers). Named to CMake, so that a build directory whose cache
    # remembers a configuration without one finds it now.
    local nvcc_path
    if ! nvcc_path=$(command -v nvcc); then
        echo "gpu_check: no nvcc on PATH, in \$CUDA_HOME/bin or in /usr/local/cuda/bin: $module cannot be built"
        return 1
    fi
    echo "nvcc: $nvcc_path"
    # Where CMakeLists.txt finds no toolkit or no NVSHMEM, it warns (deep_ep_py_skip) and builds no extension, and
    # both cmake commands succeed: that warning, or no module after the build, fails the step.
    local configure_log
    configure_log=$(mktemp) || return 1
    cmake -S . -B "$BUILD_DIR" "${generator[@]}" -DDEEP_EP_PY_INPLACE=ON -DDEEP_EP_PY_CUDA_ARCHS=90 \
        -DDEEP_EP_PY_BUILD_EMULATOR="$emulator" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$python_path" \
        -DCMAKE_CUDA_COMPILER="$nvcc_path" 2>&1 | tee "$configure_log"
    local rc=${PIPESTATUS[0]} skipped=0
    grep -q 'NOT building the CUDA extension' "$configure_log" && skipped=1
    rm -f "$configure_log"
    [ "$rc" -eq 0 ] || return "$rc"
    if [ "$skipped" -eq 1 ]; then
        echo "gpu_check: CMake builds no extension here (its warning above says why)"
        return 1
    fi
    cmake --build "$BUILD_DIR" -j"$(nproc)" ${targets[@]+"${targets[@]}"} || return
    if ! compgen -G "deep_ep_py/$module.*.so" >/dev/null; then
        echo "gpu_check: the build produced no deep_ep_py/$module.*.so"
        return 1
    fi
    ls -l deep_ep_py/"$module".*.so
}

step_ext() {
    if [ "$DEVICE" = emulated ]; then
        "$PYTHON" - <<'EOF'
from deep_ep_py import _ext

if not _ext.emulator_available():
    raise SystemExit(f"deep_ep_py._C_emu not loadable: {_ext.emulator_unavailable_reason()}")
print("emulator: the CPU emulator of the kernels is built")
EOF
        return
    fi
    "$PYTHON" - <<'EOF'
from deep_ep_py import _ext

extension = _ext.load_extension()
if extension is None:
    raise SystemExit(f"deep_ep_py._C not loadable: {_ext.kernels_unavailable_reason()}")
print("extension:", _ext.extension_path())
print("build_info:", extension.build_info())
print("gpu_status:", extension.gpu_status())
print("nvshmem: compiled", extension.nvshmem_compiled_version(), "host", extension.nvshmem_host_version())
extension.nvshmem_check_version()
if not _ext.gpu_available():
    raise SystemExit("no CUDA device visible to deep_ep_py._C")
EOF
}

# log file -> "passed=N failed=N skipped=N error=N" from pytest's closing line; where pytest was killed before it,
# counted from its -q progress characters (. F E s), marked as so far.
pytest_counts() {
    local line out="" kind count progress
    line=$(grep -E '[0-9]+ (passed|failed|skipped|errors?|xfailed|xpassed|deselected)' "$1" | tail -n 1)
    if [ -z "$line" ]; then
        progress=$(grep -E '^[.FEsxX]+( +\[ *[0-9]+%\])?$' "$1" | sed 's/ .*//' | tr -d '\n')
        echo "killed before its totals, so far: passed=$(echo -n "$progress" | tr -cd . | wc -c)" \
            "failed=$(echo -n "$progress" | tr -cd F | wc -c) skipped=$(echo -n "$progress" | tr -cd s | wc -c)" \
            "error=$(echo -n "$progress" | tr -cd E | wc -c)"
        return 0
    fi
    for kind in passed failed skipped error; do
        count=$(echo "$line" | grep -oE "[0-9]+ ${kind}s?" | grep -oE '^[0-9]+')
        out="$out ${kind}=${count:-0}"
    done
    echo "${out# }"
}

speed_vs_intranode() {  # MODE bench.json -> "MODE vs intranode: 8 ranks dispatch bf16 1.05x, ..." for the summary
    "$PYTHON" - "$1" "$2" <<'EOF'
import json
import sys

mode, path = sys.argv[1:3]
with open(path) as f:
    rows = json.load(f)["rows"]
parts = [
    f"{row['ranks']} ranks {row['path'].replace(mode + '_', '')} {row['dtype']} {row['vs_intranode']:.2f}x"
    for row in rows
    if row["mode"] == mode and row.get("vs_intranode")
]
print(f"{mode} vs intranode: " + ", ".join(parts) if parts else f"no {mode} rows next to intranode rows")
EOF
}

# ---- the run ----------------------------------------------------------------------------------------------------

echo "gpu_check: repo $REPO_DIR (commit $COMMIT), logs $LOG_DIR, ranks '$RANKS', internode ranks" \
    "'$INTERNODE_RANKS', quick=$QUICK, budget ${BUDGET_S:-0} s"

# Steps that run under timeout run in a child bash: it gets the step functions and their variables exported.
export PYTHON REPO_DIR WHEEL_DIR BUILD_DIR DEVICE
export -f step_info step_wheel step_build step_ext

run_step info "$STEP_TIMEOUT_S" bash -c step_info

if [ "$DEVICE" = emulated ]; then
    STEP_COUNT=$((STEP_COUNT + 1))
    record mps SKIP 0 "--device emulated"
else
    run_step mps 0 step_mps
    if [ "$LAST_RC" -ne 0 ]; then
        # Without MPS the ranks still run, time-sliced: every wait between them takes a time slice (ms, not us),
        # so the tests say what is correct and the figures are not the kernels'. A daemon that started but never
        # answered goes down first: CUDA clients would try to reach it.
        stop_mps >/dev/null 2>&1
        export DEEP_EP_PY_MPS=0
        add_details "the ranks run time-sliced (DEEP_EP_PY_MPS=0): correct but slow; figures not representative"
    elif [ -z "$USER_DEVICE_TIMEOUT_S" ] && ! is_skipped mps; then
        # Under MPS each kernel call takes milliseconds and the ranks enter each case together, so 10 s is ample; a
        # broken path then costs each of its batched cases 10 s, not 30 (30 stays where the ranks are time-sliced).
        export DEEP_EP_PY_TIMEOUT_S=10
    fi
    add_details "device waits time out after ${DEEP_EP_PY_TIMEOUT_S} s (DEEP_EP_PY_TIMEOUT_S)"
fi

if [ -z "$WHEEL_DIR" ] && ! is_skipped wheel; then
    STEP_COUNT=$((STEP_COUNT + 1))
    record wheel SKIP 0 "no --wheel-dir"
else
    run_step wheel "$STEP_TIMEOUT_S" bash -c step_wheel
fi

last_step_failed() {
    [ "${STEP_STATUS[$((${#STEP_STATUS[@]} - 1))]}" = FAIL ]
}

run_step build "$STEP_TIMEOUT_S" bash -c step_build
if last_step_failed; then
    NO_EXTENSION="the build failed"
    # The script's own word on why, where it gave one (no nvcc, CMake's warning, no module).
    build_reason=$(grep '^gpu_check: ' "$LAST_LOG" | tail -n 1)
    [ -n "$build_reason" ] && add_details "${build_reason#gpu_check: }"
fi

run_step ext "$STEP_TIMEOUT_S" bash -c step_ext
last_step_failed && NO_EXTENSION=${NO_EXTENSION:-"the extension check failed"}

# The internode tests run in steps of their own (tests_internode_rN), at their own rank counts, so that a hang or a
# crash there (the newest kernels) costs neither the other steps nor their figures.
INTERNODE_TESTS=(tests/gpu/test_internode_gpu.py tests/gpu/test_buffer_internode_gpu.py)
# The other test steps' modules, in the order they run (pytest keeps the command line's): the foundation first (the
# runtime: IPC under MPS, NVSHMEM up, host counters, device timeouts), then the kernel paths, then the Buffer over
# them, so that a step cut short by its limit has run the tests the later ones build on. test_layout_gpu and
# tests/test_extension.py come last because they also launch kernels in the pytest process itself, which makes it a
# client of MPS for the rest of the step: after a fatal fault of any client (an illegal address, a trap) MPS refuses
# new clients until every faulted one has exited, and the pytest process would not, so every later launch of the
# step would fail too. (Keeping the pytest process out of MPS would need launch() to hand the ranks the daemon's pipe
# directory: not done.) Modules not listed here run after these, so that none is left out.
GPU_TESTS=(tests/gpu/test_runtime_gpu.py tests/gpu/test_intranode_gpu.py tests/gpu/test_low_latency_gpu.py
    tests/gpu/test_buffer_cuda_gpu.py tests/gpu/test_trap_gpu.py tests/gpu/test_layout_gpu.py tests/test_extension.py)
for test_file in tests/gpu/test_*.py; do
    case " ${GPU_TESTS[*]} ${INTERNODE_TESTS[*]} " in
        *" $test_file "*) ;;
        *) GPU_TESTS+=("$test_file") ;;
    esac
done
# pytest -k for both kinds of test step (empty: every test).
TESTS_K_ARGS=()
if [ -n "$TESTS_K" ]; then
    TESTS_K_ARGS=(-k "$TESTS_K")
fi

last_step_ran() {
    [ "${STEP_STATUS[$((${#STEP_STATUS[@]} - 1))]}" != SKIP ]
}

# After a test step: pytest's counts into its details; with --tests-k, its exit code 5 (no test collected: the
# expression selects none of the step's modules) makes the step a SKIP. Without it, collecting nothing stays a
# failure: the tier lost its tests.
test_step_outcome() {
    last_step_ran || return 0
    local last=$((${#STEP_STATUS[@]} - 1))
    if [ "$LAST_RC" -eq 5 ] && [ -n "$TESTS_K" ]; then
        STEP_STATUS[last]=SKIP
        STEP_DETAILS[last]="no test selected by --tests-k \"$TESTS_K\""
        return 0
    fi
    add_details "$(pytest_counts "$LAST_LOG")"
}

# On a GPU anything but the GPU fails the tier (DEEP_EP_PY_EXPECT_GPU); emulated, the tier runs on the emulator.
if [ "$DEVICE" = emulated ]; then
    TIER_ENV=(DEEP_EP_PY_GPU_TIER=emulated)
else
    TIER_ENV=(DEEP_EP_PY_EXPECT_GPU=1 DEEP_EP_PY_EXPECT_KERNELS=1)
fi

tests_step() {  # rank count: the GPU tier but the internode tests
    run_step "tests_r$1" "$STEP_TIMEOUT_S" env DEEP_EP_PY_GPU_TEST_RANKS="$1" "${TIER_ENV[@]}" \
        "$PYTHON" -m pytest -q -rfEs -m gpu "${GPU_TESTS[@]}" \
        ${TESTS_K_ARGS[@]+"${TESTS_K_ARGS[@]}"} --junitxml="$LOG_DIR/pytest_r$1.xml"
    test_step_outcome
}

# Under --budget: the benchmark's steps and the internode test steps get at most these limits (a passing benchmark
# step takes well under a minute on the GPU; the internode tests are the newest kernels, the likeliest to hang), so
# that the steps after them keep their time.
# (Environment GPU_CHECK_BENCH_STEP_S, GPU_CHECK_INTERNODE_TEST_STEP_S: other caps.)
BENCH_STEP_S=$STEP_TIMEOUT_S
INTERNODE_TEST_STEP_S=$STEP_TIMEOUT_S
if [ "$BUDGET_S" -gt 0 ]; then
    bench_cap=${GPU_CHECK_BENCH_STEP_S:-150}
    internode_cap=${GPU_CHECK_INTERNODE_TEST_STEP_S:-180}
    BENCH_STEP_S=$((STEP_TIMEOUT_S < bench_cap ? STEP_TIMEOUT_S : bench_cap))
    INTERNODE_TEST_STEP_S=$((STEP_TIMEOUT_S < internode_cap ? STEP_TIMEOUT_S : internode_cap))
fi

tests_internode_step() {  # rank count
    run_step "tests_internode_r$1" "$INTERNODE_TEST_STEP_S" env DEEP_EP_PY_GPU_TEST_RANKS="$1" "${TIER_ENV[@]}" \
        "$PYTHON" -m pytest -q -rfEs -m gpu "${INTERNODE_TESTS[@]}" \
        ${TESTS_K_ARGS[@]+"${TESTS_K_ARGS[@]}"} --junitxml="$LOG_DIR/pytest_internode_r$1.xml"
    test_step_outcome
}

# The benchmark measures the kernels, including those still opt-in until the GPU tier passes (README, Status):
# the reference fallback on GPU tensors goes through host memory and would only measure gloo. One step per rank
# count, so that what a budget cuts short loses only its own rows (and not those of the modes that finished). Emulated, tiny sizes: the figures mean nothing
# there, the run shows that every benchmark path works.
BENCH_DEVICE_ARGS=(--device cuda)
if [ "$DEVICE" = emulated ]; then
    BENCH_DEVICE_ARGS=(--device emulated --tokens 64 --hidden 256 --ll-tokens 16 --experts 64 --topk 4 --warmup 1
        --iters 2 --roof-bytes 1048576)
fi

bench_step() {  # rank count
    local json="$LOG_DIR/bench_r$1.json"
    # low_latency_puts last: the decode rows again with every delivery an NVSHMEM put and signal (the path a NIC
    # takes); what fails there leaves the other modes' rows.
    local args=("${BENCH_DEVICE_ARGS[@]}" --ranks "$1" --paths "normal,one_copy,low_latency,low_latency_puts"
        --json "$json")
    [ "$QUICK" -eq 1 ] && args+=(--quick)
    run_step "bench_r$1" "$BENCH_STEP_S" env DEEP_EP_PY_UNVERIFIED_KERNELS="${DEEP_EP_PY_UNVERIFIED_KERNELS:-1}" \
        "$PYTHON" -m bench "${args[@]}"
    # A launch that failed or was cut short (SIGINT) still writes the rows of the modes every rank finished.
    if last_step_ran && [ -f "$json" ]; then
        add_details "$json"
        add_details "$(speed_vs_intranode one_copy "$json" 2>&1 | tail -n 1)"
    fi
}

# The internode rows next to the intranode rows of the same launch, data and rank count (the target: no slower),
# by P2P stores between the emulated nodes and by NVSHMEM puts (the path a NIC takes).
bench_internode_step() {  # rank count
    local json="$LOG_DIR/bench_internode_r$1.json"
    local args=("${BENCH_DEVICE_ARGS[@]}" --ranks "$1" --paths "normal,internode,internode_puts" --nodes 2
        --json "$json")
    [ "$QUICK" -eq 1 ] && args+=(--quick)
    run_step "bench_internode_r$1" "$BENCH_STEP_S" \
        env DEEP_EP_PY_UNVERIFIED_KERNELS="${DEEP_EP_PY_UNVERIFIED_KERNELS:-1}" "$PYTHON" -m bench "${args[@]}"
    if last_step_ran && [ -f "$json" ]; then
        add_details "$json"
        add_details "$(speed_vs_intranode internode "$json" 2>&1 | tail -n 1)"
        add_details "$(speed_vs_intranode internode_puts "$json" 2>&1 | tail -n 1)"
    fi
}

# Every path once first, with the figures at the most ranks in between (the header says why), then the other rank
# counts, then the internode benchmark (its rows compare with intranode rows of the same launch).
read -r -a RANK_LIST <<<"$RANKS"
read -r -a INTERNODE_RANK_LIST <<<"$INTERNODE_RANKS"
LAST_RANKS=${RANK_LIST[$((${#RANK_LIST[@]} - 1))]}
tests_step "${RANK_LIST[0]}"
bench_step "$LAST_RANKS"
tests_internode_step "${INTERNODE_RANK_LIST[0]}"
for num_ranks in "${RANK_LIST[@]}"; do
    [ "$num_ranks" = "$LAST_RANKS" ] || bench_step "$num_ranks"
done
for num_ranks in "${RANK_LIST[@]:1}"; do
    tests_step "$num_ranks"
done
for num_ranks in "${INTERNODE_RANK_LIST[@]:1}"; do
    tests_internode_step "$num_ranks"
done
for num_ranks in "${INTERNODE_RANK_LIST[@]}"; do
    bench_internode_step "$num_ranks"
done

if [ "$MPS_STARTED" -eq 1 ]; then
    run_step mps_stop 0 stop_mps
fi

echo "gpu_check: finished in $((SECONDS - TOTAL_STARTED)) s"
print_summary
num_failed=$?
copy_mps_logs
write_archive
exit "$num_failed"
