"""Triton kernels (GPU; on CPU only under TRITON_INTERPRET=1). One file per op:
kernels, then host launchers that flatten, choose blocks, allocate and launch."""
