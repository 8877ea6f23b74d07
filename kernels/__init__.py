"""Hand-written GPU kernels (Triton), each with a launcher, a torch reference and a parity test."""
