"""Evaluation: perplexity, backend validation, latency benchmarks, Wasserstein analysis and plots."""
