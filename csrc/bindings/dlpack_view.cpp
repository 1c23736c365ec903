#include "dlpack_view.hpp"

#include <Python.h>

#include "../common/exception.hpp"

namespace py = pybind11;

namespace ep {

namespace {

// The DLPack v0.x ABI (dlpack.h), the layout torch.from_dlpack reads from a "dltensor" capsule. Only the fields
// a 1-D byte tensor needs are ever set.
struct DLDevice {
    int32_t device_type;
    int32_t device_id;
};
struct DLDataType {
    uint8_t code;  // 1 = unsigned int
    uint8_t bits;
    uint16_t lanes;
};
struct DLTensor {
    void* data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t* shape;
    int64_t* strides;  // nullptr: compact row-major
    uint64_t byte_offset;
};
struct DLManagedTensor {
    DLTensor dl_tensor;
    void* manager_ctx;
    void (*deleter)(DLManagedTensor* self);
};

constexpr int kDLCpu = 1;
constexpr int kDLCuda = 2;
constexpr uint8_t kDLUInt = 1;
constexpr const char* kCapsuleName = "dltensor";
constexpr const char* kUsedCapsuleName = "used_dltensor";

struct ViewContext {
    DLManagedTensor managed;
    int64_t shape;
    PyObject* on_release;  // owned reference
};

// torch calls this from whatever thread drops the last reference, with or without the GIL.
void release_view(DLManagedTensor* managed) {
    auto* context = static_cast<ViewContext*>(managed->manager_ctx);
    // At interpreter exit there is nobody left to tell; the memory goes with the process.
    if (Py_IsInitialized()) {
        PyGILState_STATE gil = PyGILState_Ensure();
        PyObject* result = PyObject_CallNoArgs(context->on_release);
        if (result == nullptr) {
            PyErr_WriteUnraisable(context->on_release);
        } else {
            Py_DECREF(result);
        }
        Py_DECREF(context->on_release);
        PyGILState_Release(gil);
    }
    delete context;
}

// A capsule nobody consumed still owns its view.
void destroy_capsule(PyObject* capsule) {
    if (PyCapsule_IsValid(capsule, kUsedCapsuleName)) return;
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, kCapsuleName));
    if (managed == nullptr) {
        PyErr_Clear();
        return;
    }
    managed->deleter(managed);
}

}  // namespace

py::capsule make_dlpack_view(uintptr_t ptr, int64_t num_bytes, int device_type, int device_id, py::object on_release) {
    EP_HOST_ASSERT(ptr != 0);
    EP_HOST_ASSERT(num_bytes > 0);
    EP_HOST_ASSERT_MSG((device_type == kDLCpu || device_type == kDLCuda), "device_type ", device_type,
                       " is neither DLPack CPU (1) nor CUDA (2)");
    EP_HOST_ASSERT(device_id >= 0);
    EP_HOST_ASSERT_MSG(PyCallable_Check(on_release.ptr()), "on_release must be callable");
    auto* context = new ViewContext{};
    context->shape = num_bytes;
    context->on_release = on_release.release().ptr();
    DLTensor& tensor = context->managed.dl_tensor;
    tensor.data = reinterpret_cast<void*>(ptr);
    tensor.device = DLDevice{device_type, device_id};
    tensor.ndim = 1;
    tensor.dtype = DLDataType{kDLUInt, 8, 1};
    tensor.shape = &context->shape;
    tensor.strides = nullptr;
    tensor.byte_offset = 0;
    context->managed.manager_ctx = context;
    context->managed.deleter = release_view;
    PyObject* capsule = PyCapsule_New(&context->managed, kCapsuleName, destroy_capsule);
    if (capsule == nullptr) {
        release_view(&context->managed);
        throw py::error_already_set();
    }
    return py::reinterpret_steal<py::capsule>(capsule);
}

}  // namespace ep
