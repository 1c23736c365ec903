// One exception type for the whole extension, and the check macros that throw it.
//
// Every check puts file:line and the values it saw into the message, so a Python traceback alone says what went
// wrong. Nothing here calls exit(): the extension lives inside a Python process.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace ep {

class EPException : public std::runtime_error {
public:
    explicit EPException(const std::string& message) : std::runtime_error(message) {}
};

// A wait (host or device) ran past its deadline. Python sees deep_ep_py.errors.DeepEPTimeoutError.
class EPTimeoutException : public EPException {
public:
    explicit EPTimeoutException(const std::string& message) : EPException(message) {}
};

namespace detail {

template <typename T, typename = void>
struct is_streamable : std::false_type {};
template <typename T>
struct is_streamable<T, std::void_t<decltype(std::declval<std::ostream&>() << std::declval<const T&>())>>
    : std::true_type {};

// Prints a value for an error message: small ints as numbers (not chars), pointers in hex, bools as words.
template <typename T>
std::string stringify(const T& value) {
    std::ostringstream out;
    if constexpr (std::is_same_v<T, bool>) {
        out << (value ? "true" : "false");
    } else if constexpr (std::is_integral_v<T> && sizeof(T) == 1) {
        out << static_cast<int>(value);
    } else if constexpr (std::is_pointer_v<T>) {
        out << reinterpret_cast<const void*>(value);
    } else if constexpr (std::is_enum_v<T>) {
        out << static_cast<std::underlying_type_t<T>>(value);
    } else if constexpr (is_streamable<T>::value) {
        out << value;
    } else {
        out << "<unprintable>";
    }
    return out.str();
}

// "csrc/x/y.cu" rather than the build machine's absolute path.
constexpr const char* source_path(const char* file) {
    const char* result = file;
    for (const char* p = file; *p != '\0'; ++p) {
        if (p[0] == 'c' && p[1] == 's' && p[2] == 'r' && p[3] == 'c' && p[4] == '/') result = p;
    }
    return result;
}

template <typename... Parts>
std::string concat(Parts&&... parts) {
    std::ostringstream out;
    (out << ... << parts);
    return out.str();
}

// The result of a checked expression: whether it held, and the operand values for the message.
struct CheckResult {
    bool passed;
    std::string values;

    // `a == b && c` reaches here as `(a == b) && c`: decomposing it would lose short-circuit evaluation.
    template <typename R>
    CheckResult operator&&(const R&) const {
        static_assert(sizeof(R) == 0, "parenthesise compound conditions: EP_HOST_ASSERT((a == b && c)), or use two asserts");
        return {};
    }
    template <typename R>
    CheckResult operator||(const R&) const {
        static_assert(sizeof(R) == 0, "parenthesise compound conditions: EP_HOST_ASSERT((a == b || c))");
        return {};
    }
};

// `Decomposer() <= a == b` parses as `(Decomposer() <= a) == b`: ExprLhs captures `a`, its comparison operator
// captures `b`, and the message can show both values (the technique of Catch2/doctest).
template <typename L>
struct ExprLhs {
    const L& lhs;

#define EP_DEFINE_COMPARISON(OP)                                                                   \
    template <typename R>                                                                          \
    CheckResult operator OP(const R& rhs) const {                                                  \
        return {static_cast<bool>(lhs OP rhs), stringify(lhs) + " " #OP " " + stringify(rhs)};    \
    }
    EP_DEFINE_COMPARISON(==)
    EP_DEFINE_COMPARISON(!=)
    EP_DEFINE_COMPARISON(<)
    EP_DEFINE_COMPARISON(<=)
    EP_DEFINE_COMPARISON(>)
    EP_DEFINE_COMPARISON(>=)
#undef EP_DEFINE_COMPARISON

    // && and || cannot be decomposed without losing short-circuit evaluation.
    template <typename R>
    CheckResult operator&&(const R&) const {
        static_assert(sizeof(R) == 0, "parenthesise compound conditions: EP_HOST_ASSERT((a && b))");
        return {};
    }
    template <typename R>
    CheckResult operator||(const R&) const {
        static_assert(sizeof(R) == 0, "parenthesise compound conditions: EP_HOST_ASSERT((a || b))");
        return {};
    }

    CheckResult to_result() const { return {static_cast<bool>(lhs), stringify(lhs)}; }
};

struct Decomposer {
    template <typename L>
    ExprLhs<L> operator<=(const L& lhs) const {
        return {lhs};
    }
};

inline CheckResult to_result(CheckResult result) { return result; }
template <typename L>
CheckResult to_result(const ExprLhs<L>& expr) {
    return expr.to_result();
}

[[noreturn]] inline void throw_check_failure(const char* file, int line, const char* expr, const std::string& values,
                                             const std::string& message) {
    std::string text = concat(source_path(file), ":", line, ": check failed: ", expr, " (values: ", values, ")");
    if (!message.empty()) text += ": " + message;
    throw EPException(text);
}

}  // namespace detail
}  // namespace ep

// EP_HOST_ASSERT(a == b) throws ep::EPException "file:line: check failed: a == b (values: 1 == 2)".
#define EP_HOST_ASSERT(cond) EP_HOST_ASSERT_MSG(cond, "")

// EP_HOST_ASSERT_MSG(cond, parts...) appends the streamed parts to the message.
#define EP_HOST_ASSERT_MSG(cond, ...)                                                                      \
    do {                                                                                                   \
        const ::ep::detail::CheckResult ep_check_result_ =                                                 \
            ::ep::detail::to_result(::ep::detail::Decomposer() <= cond);                                   \
        if (!ep_check_result_.passed)                                                                      \
            ::ep::detail::throw_check_failure(__FILE__, __LINE__, #cond, ep_check_result_.values,          \
                                              ::ep::detail::concat(__VA_ARGS__));                          \
    } while (0)

#define CUDA_CHECK(expr)                                                                                   \
    do {                                                                                                   \
        const cudaError_t ep_cuda_status_ = (expr);                                                        \
        if (ep_cuda_status_ != cudaSuccess)                                                                \
            throw ::ep::EPException(::ep::detail::concat(                                                  \
                ::ep::detail::source_path(__FILE__), ":", __LINE__, ": CUDA error ",                       \
                cudaGetErrorName(ep_cuda_status_), " (", static_cast<int>(ep_cuda_status_),                \
                "): ", cudaGetErrorString(ep_cuda_status_), " in ", #expr));                               \
    } while (0)

// NVSHMEM host calls return 0 on success.
#define NVSHMEM_CHECK(expr)                                                                                \
    do {                                                                                                   \
        const int ep_nvshmem_status_ = static_cast<int>(expr);                                             \
        if (ep_nvshmem_status_ != 0)                                                                       \
            throw ::ep::EPException(::ep::detail::concat(::ep::detail::source_path(__FILE__), ":",         \
                                                         __LINE__, ": NVSHMEM error ", ep_nvshmem_status_, \
                                                         " in ", #expr));                                  \
    } while (0)

// Device-side assert that stays on in release builds: prints where and why, then traps, which surfaces on the
// host as cudaErrorLaunchFailure / cudaErrorIllegalInstruction at the next synchronisation.
#ifdef __CUDACC__
#define EP_DEVICE_ASSERT(cond)                                                                                 \
    do {                                                                                                       \
        if (!(cond)) {                                                                                         \
            printf("%s:%d: device assertion failed: %s (block %d, thread %d)\n", __FILE__, __LINE__, #cond,    \
                   static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x));                               \
            asm volatile("trap;");                                                                             \
        }                                                                                                      \
    } while (0)
#elif defined(DEEP_EP_PY_EMULATE)
// The emulator's trap: the process dies with the same message (a GPU trap also ends the context).
#define EP_DEVICE_ASSERT(cond)                                                                                 \
    do {                                                                                                       \
        if (!(cond)) {                                                                                         \
            std::fprintf(stderr, "%s:%d: device assertion failed: %s (block %d, thread %d)\n", __FILE__,       \
                         __LINE__, #cond, static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x));        \
            std::abort();                                                                                      \
        }                                                                                                      \
    } while (0)
#endif
