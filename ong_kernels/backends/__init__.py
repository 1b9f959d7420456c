"""Kernel backends. `reference` is pure PyTorch (the oracle and the fallback); `cpu` and `cuda`
run the compiled kernels in ong_kernels._C. Each module exposes the same functions."""
