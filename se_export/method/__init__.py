"""The method: capture calibration inputs, fit routers, prune experts (SparseGPT and baselines), expand a model."""
