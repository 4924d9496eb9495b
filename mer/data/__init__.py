"""Datasets: the manifest contract (:mod:`mer.data.manifest`), generated data in the MER2025 release layout
(:mod:`mer.synth.dataset`) and the importer of the real MER2025/2026 release (:mod:`mer.data.mer2025`).

Submodules are imported on demand so ``import mer.data`` stays cheap (no OpenCV/ffmpeg on the import path).
"""
