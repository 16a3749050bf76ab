"""Triton kernels of dist_lm (import each module directly; nothing here imports Triton eagerly)."""
