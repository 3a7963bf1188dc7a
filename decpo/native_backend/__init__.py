"""The native CPU backend: C++ kernels (kernels/, built by CMake into
libdecpo_native.so) called through ctypes. library.py loads the library; one file
per op (same stems as decpo.torch_backend and decpo.triton_backend) wraps its
kernels."""

from decpo.native_backend.library import DTYPES, is_available, unavailable_reason

__all__ = ["DTYPES", "is_available", "unavailable_reason"]
