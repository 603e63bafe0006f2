"""GPU kernels the transforms swap in: Triton norms, attention backends."""
