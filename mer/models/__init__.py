"""Model registry and offline tiny models."""
