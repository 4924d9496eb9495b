"""Speech encoder: mean over time of the HuBERT last hidden state (16 kHz mono input)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mer.encoders.base import ERROR, OK, BranchEncoder, column, is_missing, to_f32, upstream_status

# Shorter clips are zero-padded to this many seconds: the conv feature extractor needs a minimum length.
_MIN_SECONDS = 0.1


class AudioEncoder(BranchEncoder):
    """Pads a batch of waveforms with an attention mask and pools the frame states under the mask."""

    branch = "audio"
    input_columns = ("audio", "audio_status")
    output_columns = ("audio", "audio_status", "audio_seq", "audio_error")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sample_rate = int(cfg.extract.decode.audio_sample_rate)
        self.max_samples = int(cfg.extract.decode.max_audio_seconds * self.sample_rate)
        self.min_samples = int(_MIN_SECONDS * self.sample_rate)
        # Waveforms are long: fewer clips per forward than frames.
        self.chunk = 16 if self.device.startswith("cuda") else 4

    def _forward(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Per-clip frame states [T_i, D] (padding frames removed)."""
        import torch

        feats = self.processor(waves, sampling_rate=self.sample_rate, padding=True,
                               return_attention_mask=True, return_tensors="pt")
        x = feats["input_values"].to(self.device, self.dtype)
        am = feats.get("attention_mask")
        am = am.to(self.device) if am is not None else None
        hs = self.model(input_values=x, attention_mask=am).last_hidden_state.float()
        lengths = torch.tensor([len(w) for w in waves])
        if hasattr(self.model, "_get_feat_extract_output_lengths"):
            frames = self.model._get_feat_extract_output_lengths(lengths).long().tolist()
        else:  # proportional fallback for encoders without the helper
            frames = [max(1, round(hs.shape[1] * int(n) / x.shape[1])) for n in lengths]
        return [to_f32(hs[i, : max(1, min(int(f), hs.shape[1]))]) for i, f in enumerate(frames)]

    def encode(self, batch: dict[str, np.ndarray], n: int) -> dict[str, list[Any]]:
        audio = column(batch, "audio", n)
        astat = column(batch, "audio_status", n)
        dstat = column(batch, "decode_status", n)
        status = [""] * n
        errors: dict[int, str] = {}
        waves: dict[int, np.ndarray] = {}
        for i in range(n):
            a = audio[i]
            if is_missing(a) or upstream_status(astat[i], default=OK) == "no_audio":
                status[i] = upstream_status(astat[i], dstat[i], default="no_audio")
                continue
            w = np.asarray(a, dtype=np.float32).reshape(-1)[: self.max_samples]
            if not np.isfinite(w).all():
                status[i], errors[i] = ERROR, "audio: non-finite samples"
                continue
            if len(w) < self.min_samples:
                w = np.pad(w, (0, self.min_samples - len(w)))
            waves[i] = w

        def forward(rows: list[int]) -> dict[int, np.ndarray]:
            return dict(zip(rows, self._forward([waves[r] for r in rows])))

        # Sort by length so each padded chunk wastes little compute.
        order = sorted(waves, key=lambda r: len(waves[r]))
        encoded: dict[int, np.ndarray] = {}
        for s in range(0, len(order), self.chunk):
            encoded.update(self._run_rows(order[s:s + self.chunk], forward, errors))
        return self.outputs("audio", status, encoded, errors)
