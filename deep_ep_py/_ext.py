"""Finds and loads the compiled extension ``deep_ep_py._C``; never raises at import.

The extension is optional: a build without nvcc or NVSHMEM installs pure Python, and the reference backend serves
every call. ``has_kernels()`` says whether the kernels are there, ``kernels_unavailable_reason()`` why not.

With DEEP_EP_PY_EMULATE_DEVICE=1 (``emulated()``) the extension is ``deep_ep_py._C_emu`` instead: the same kernels
compiled for the host, with the same Python API (deep_ep_py.device says what changes for the callers).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import sys
from importlib import metadata
from types import ModuleType

__all__ = [
    "emulated",
    "emulator_available",
    "emulator_unavailable_reason",
    "extension_name",
    "gpu_available",
    "has_kernels",
    "kernels_unavailable_reason",
    "load_extension",
]

_NVSHMEM_HOST_LIBRARY = "libnvshmem_host.so.3"
EMULATE_DEVICE_ENV = "DEEP_EP_PY_EMULATE_DEVICE"
_EXTENSION = "deep_ep_py._C"
_EMULATOR = "deep_ep_py._C_emu"

# Per extension name: (module or None, why None). Each is tried once per process; which one is wanted is read from
# the environment at every call.
_loaded: dict[str, tuple[ModuleType | None, str]] = {}


def emulated() -> bool:
    """Whether DEEP_EP_PY_EMULATE_DEVICE selects the CPU emulator of the kernels (read at every call)."""
    return os.environ.get(EMULATE_DEVICE_ENV, "") not in ("", "0")


def extension_name() -> str:
    """The extension load_extension() loads: "deep_ep_py._C", or "deep_ep_py._C_emu" under emulation."""
    return _EMULATOR if emulated() else _EXTENSION


def _preload_nvshmem_host() -> str | None:
    """Loads libnvshmem_host.so.3 from the installed nvidia-nvshmem wheel with RTLD_GLOBAL, so the extension
    resolves it whatever its build-time rpath says (pip's isolated build env is gone by now). NVSHMEM_HOME, when
    set, wins, as it does in the build. Returns an error text, or None when loaded (or nothing to load: the
    extension's own rpath then gets its chance)."""
    candidates = []
    nvshmem_home = os.environ.get("NVSHMEM_HOME")
    if nvshmem_home:
        candidates.append(os.path.join(nvshmem_home, "lib", _NVSHMEM_HOST_LIBRARY))
    try:
        import nvidia.nvshmem as nvshmem_package

        candidates.extend(os.path.join(path, "lib", _NVSHMEM_HOST_LIBRARY) for path in nvshmem_package.__path__)
    except ImportError:
        pass
    errors = []
    for path in candidates:
        if not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return None
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    return "; ".join(errors) or None


def _installed_extension_path(name: str) -> str | None:
    """The extension `name` (deep_ep_py._C or _C_emu) of the installed deep_ep_py distribution, when this package is
    imported from elsewhere (a source checkout on sys.path ahead of site-packages: `python -m bench` or
    `python -m pytest` in a clone after `pip install .`). The checkout's Python then drives the installed build's
    kernels."""
    try:
        distribution = metadata.distribution("deep_ep_py")
    except metadata.PackageNotFoundError:
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    prefix = name.rpartition(".")[2] + "."
    for file in distribution.files or ():
        if file.parent.name == "deep_ep_py" and file.name.startswith(prefix) and file.name.endswith(".so"):
            path = os.path.abspath(str(distribution.locate_file(file)))
            if os.path.dirname(path) != here and os.path.exists(path):
                return path
    return None


def _load_from(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def extension_path() -> str | None:
    """Where the loaded extension (deep_ep_py._C, or _C_emu under emulation) came from (None when not loaded)."""
    extension = load_extension()
    return getattr(extension, "__file__", None) if extension is not None else None


def load_extension() -> ModuleType | None:
    """Returns ``deep_ep_py._C`` (``deep_ep_py._C_emu`` under emulation), or None when it is not built or cannot
    load (see kernels_unavailable_reason()). Cached: the import is tried once per process."""
    return _load(extension_name())


def _load(name: str) -> ModuleType | None:
    if name not in _loaded:
        _loaded[name] = _import(name)
    return _loaded[name][0]


# Why an extension is not in the package directory, by name.
_MISSING = {
    _EXTENSION: "deep_ep_py was installed (or is imported from a source tree) without its CUDA extension (no nvcc or "
    "NVSHMEM at build time); reinstall with the CUDA toolkit on PATH and nvidia-nvshmem-cu13 installed",
    _EMULATOR: f"{EMULATE_DEVICE_ENV}=1 selects the CPU emulator of the kernels, which is built by cmake with "
    "-DDEEP_EP_PY_BUILD_EMULATOR=ON (unset the variable to use deep_ep_py._C)",
}


def _import(name: str) -> tuple[ModuleType | None, str]:
    """(the extension `name`, "") or (None, why not). The emulator emulates NVSHMEM too: no host library to preload."""
    extension, unavailable_reason = None, ""
    preload_error = _preload_nvshmem_host() if name == _EXTENSION else None
    try:
        try:
            extension = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            installed = _installed_extension_path(name) if exc.name == name else None
            if installed is None:
                raise
            extension = _load_from(installed, name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            unavailable_reason = f"{name} failed to import: {exc!r}"
        else:
            package_dir = os.path.dirname(os.path.abspath(__file__))
            unavailable_reason = f"no {name} in {package_dir}: {_MISSING[name]}"
    except Exception as exc:  # an ImportError from the loader, or anything the module init raised
        unavailable_reason = f"{name} failed to import: {exc!r}"
        if preload_error:
            unavailable_reason += f" (preloading {_NVSHMEM_HOST_LIBRARY} failed: {preload_error})"
    return extension, unavailable_reason


def has_kernels() -> bool:
    """True when the CUDA extension (the emulator, under emulation) is built and importable (a GPU may still be
    missing: see gpu_available())."""
    return load_extension() is not None


def kernels_unavailable_reason() -> str:
    """Why has_kernels() is False; empty when it is True."""
    load_extension()
    return _loaded[extension_name()][1]


def _has_device(extension: ModuleType | None) -> bool:
    if extension is None:
        return False
    try:
        return extension.device_count() > 0
    except Exception:
        return False


def gpu_available() -> bool:
    """True when the kernels are built and at least one CUDA device is visible; under emulation, when the emulator
    is built (it has one device)."""
    return _has_device(load_extension())


def emulator_available() -> bool:
    """Whether the CPU emulator (deep_ep_py._C_emu) is built and has its device, whatever DEEP_EP_PY_EMULATE_DEVICE
    says: for callers that decide whether to set it (a test tier that runs on the emulator where no GPU is)."""
    return _has_device(_load(_EMULATOR))


def emulator_unavailable_reason() -> str:
    """Why the CPU emulator cannot be loaded; empty when it can."""
    _load(_EMULATOR)
    return _loaded[_EMULATOR][1]
