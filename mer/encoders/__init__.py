"""One ``map_batches`` callable class per ECMF branch (numpy batch format).

Each class loads its model once per actor and adds ``<branch>`` (pooled float32 vector or None),
``<branch>_status``, ``<branch>_error`` and, with ``keep_sequence``, ``<branch>_seq`` to the batch.
"""

from __future__ import annotations

from mer.config import BRANCHES, MerConfig, describes
from mer.encoders.audio import AudioEncoder
from mer.encoders.base import BranchEncoder
from mer.encoders.text import TextEncoder
from mer.encoders.visual import FaceEncoder, GlobalVisualEncoder
from mer.models.registry import load_config_of

ENCODERS: dict[str, type[BranchEncoder]] = {
    "global_visual": GlobalVisualEncoder,
    "face": FaceEncoder,
    "audio": AudioEncoder,
    "text": TextEncoder,
}


def _hidden_size(conf) -> int:
    for c in (conf, getattr(conf, "vision_config", None), getattr(conf, "text_config", None)):
        if c is not None and getattr(c, "hidden_size", None):
            return int(c.hidden_size)
    raise ValueError(f"cannot tell the hidden size of {type(conf).__name__}")


def encoder_dims(cfg: MerConfig) -> dict[str, int]:
    """Branch -> output vector size, read from each model's config (no weights loaded).

    Includes ``text_enriched`` (same size as ``text``) when ``enrich.text_source`` is ``both``, and
    ``visual_description`` (also the text encoder's) when ``extract.describe`` is on.
    """
    dims = {b: _hidden_size(load_config_of(getattr(cfg.models, b), cfg)) for b in BRANCHES}
    if cfg.enrich.text_source == "both":
        dims["text_enriched"] = dims["text"]
    if describes(cfg):
        dims["visual_description"] = dims["text"]
    return dims


__all__ = ["ENCODERS", "AudioEncoder", "BranchEncoder", "FaceEncoder", "GlobalVisualEncoder", "TextEncoder",
           "encoder_dims"]
