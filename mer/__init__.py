"""mer: multimodal emotion recognition (ECMF) on Ray."""
__version__ = "0.1.0"
