"""Evaluation of synthetic images: downstream utility and feature-space fidelity.

- `utility.evaluate_utility`: classifier accuracy on the real test set, with
  DP-safe checkpoint selection on a synthetic hold-out by default.
- `fidelity.compute_fidelity`: FID/KID via clean-fid on a *named* feature network.

Submodules are imported explicitly (clean-fid is slow to import).
"""
