"""Streaming multimodal feature extraction: decode once per clip, face crops, encoder actor pools, store.

Public entry points: :func:`mer.extract.pipeline.extract_features`, :func:`mer.extract.bench.bench_extract`,
:func:`mer.extract.schema.check_store`; the store is read with :func:`mer.parts.read_parts`.
"""
