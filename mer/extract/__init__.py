"""Streaming multimodal feature extraction: decode once per clip, face crops, encoder actor pools, store.

Public entry points: :func:`mer.extract.pipeline.extract_features`, :func:`mer.extract.bench.bench_extract`,
:func:`mer.extract.store.read_features`, :func:`mer.extract.store.stored_ids`,
:func:`mer.extract.store.check_store`.
"""
