"""Streaming multimodal feature extraction: decode once per clip, face crops, encoder actor pools, store.

Public entry points: :func:`mer.extract.pipeline.extract_features`, :func:`mer.extract.pipeline.build_stages`,
:func:`mer.extract.schema.check_store`; the store is read through :class:`mer.store.parts.PartStore`
(``mer bench extract``, :mod:`mer.bench.extract`, measures it).
"""
