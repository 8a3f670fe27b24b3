"""Storage: the packed sparse format, the mask codec, checkpoints and the resume state."""
