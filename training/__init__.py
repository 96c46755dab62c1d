"""Offline training of the digit and cat/dog classifiers, exported as a Triton-compatible model repository."""

__all__ = ["augment", "cli", "export", "loop", "mnist", "nets", "photos", "repository", "tasks"]
