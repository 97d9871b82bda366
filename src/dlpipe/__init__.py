"""dlpipe: train, track, register, optimize and serve deep-learning models."""

__version__ = "0.1.0"
