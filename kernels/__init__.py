"""Hand-written Triton building blocks and the sparse attention kernels."""
