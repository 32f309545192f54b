"""Evaluation: protocols and their presets, the one training loop, scoring a synthetic set by
training fresh networks on it, and kernel ridge regression for kernel-based methods."""
