"""Evaluation of synthetic images: downstream utility and feature-space fidelity.

- `selection`: the checkpoint-selection rules of the three protocols (dp-safe, noisy-val, test-set).
- `utility.evaluate_protocols`: classifiers trained once on the synthetic set, every protocol's
  rule applied to the same trajectory, real-test accuracy read in one final pass; `classifier_fit`
  trains and scores one classifier, `results` holds what a protocol returns.
- `fidelity`: FID/KID via clean-fid on a *named* feature network (Inception-v3 when its weights
  are on disk); `manifold` (k-NN precision/recall), `fld`, `inception_score`; `feature_cache`.

Submodules are imported explicitly (clean-fid is slow to import).
"""
