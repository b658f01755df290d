"""Low-level kernels for the adapter layers: fast dropout masks and LoRA autograd functions."""
