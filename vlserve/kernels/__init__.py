"""Attention kernels. Each Triton kernel sits beside the plain-torch reference used on CPU and in tests."""
