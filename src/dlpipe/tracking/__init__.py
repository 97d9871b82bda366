"""Experiment tracking and the model registry, both on MLflow."""
