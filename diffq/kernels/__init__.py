"""Low-bit compute kernels used by deployment (pure torch and Triton)."""
