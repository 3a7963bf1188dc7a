"""Public ops: validation, backend dispatch, torch custom ops and autograd."""
