"""Pure-PyTorch backend: chunked, memory-lean implementations that run on any device."""
