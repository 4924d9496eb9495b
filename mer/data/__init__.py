"""Datasets: the manifest contract (:mod:`mer.data.manifest`) and the importer of the real MER2025/2026 release
(:mod:`mer.data.mer2025`); generated data in the same layout is :mod:`mer.synth.dataset`'s.

Submodules are imported on demand so ``import mer.data`` stays cheap (no OpenCV/ffmpeg on the import path).
"""
