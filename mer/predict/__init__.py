"""Prediction: batch scoring of a run over a feature store or raw videos, and ensembles of finished runs."""
