"""One router per resource: predict, health, metrics, models, v2 (Open Inference Protocol)."""
