"""A run directory: its layout (which run a directory stands for) and what it was trained on (provenance)."""
