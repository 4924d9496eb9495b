"""Decode stage: each clip is decoded ONCE (frames + 16 kHz audio); every encoder branch reads the result.

``ClipDecoder`` is a CPU ``map_batches`` callable class (never placed in a GPU actor). It owns a
persistent decode child process (:mod:`mer.extract.subproc`) so that a clip whose decode hangs is
abandoned after ``decode.timeout_s`` and retried with ``decode.fallback_backend``; the child is also
recycled every ``decode.recycle_every`` clips to bound decoder memory leaks.

Per-row outputs: ``frames`` (uint8 [T, S, S, 3] or None), ``decode_status`` (``ok``, ``missing_file``,
``decode_error``, ``decode_timeout``), ``decode_error`` (message or None), ``audio`` (float32 [N] or
None), ``audio_status`` (``ok``, ``no_audio``, or the decode failure), ``decode_backend``; ``text`` passes
through untouched.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from mer import storage
from mer.batches import object_column
from mer.config import MerConfig
from mer.extract.decoders import DecodeParams
from mer.extract.subproc import ChildDied, DecodeProcess, DecodeTimeout

log = logging.getLogger("mer.extract")

OK = "ok"
MISSING_FILE = "missing_file"
DECODE_ERROR = "decode_error"
DECODE_TIMEOUT = "decode_timeout"
NO_AUDIO = "no_audio"


def _uri(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    s = str(v).strip()
    return s or None


class ClipDecoder:
    """``map_batches`` callable class: manifest rows → decoded frames, audio and statuses."""

    input_columns = ("clip_id", "video_uri")
    optional_inputs = ("audio_uri", "text")
    output_columns = ("frames", "decode_status", "decode_error", "audio", "audio_status", "decode_backend")

    def __init__(self, cfg: MerConfig, backend: str | None = None, sampling: str | None = None):
        d = cfg.extract.decode
        storage.configure(cfg.storage.s3_endpoint_url, cfg.storage.s3_region)
        self.backend = backend or d.backend
        self.fallback = None if d.fallback_backend == "none" else d.fallback_backend
        if self.fallback == self.backend:
            self.fallback = None
        params = DecodeParams.from_config(cfg)
        if sampling:
            params = DecodeParams(**{**params.to_dict(), "sampling": sampling})
        self.params = params.to_dict()
        self.timeout = float(d.timeout_s)
        self.child = DecodeProcess(recycle_every=d.recycle_every)
        self.tmp = tempfile.mkdtemp(prefix="mer-decode-")
        self.clips = 0
        self.fallbacks = 0
        self.timeouts = 0

    # ------------------------------------------------------------------------------------------ inputs
    def _local(self, uri: str | None) -> tuple[str | None, str | None, str | None]:
        """(local path, status, message): S3 objects are fetched to a temp file; bad inputs get a status."""
        if uri is None:
            return None, MISSING_FILE, "no video_uri"
        try:
            if storage.is_s3(uri):
                if not storage.exists(uri):
                    return None, MISSING_FILE, f"missing file: {uri}"
                path = os.path.join(self.tmp, f"{self.clips}-{os.path.basename(uri)}")
                with open(path, "wb") as f:
                    f.write(storage.read_bytes(uri))
            else:
                path = uri[len("file://"):] if uri.startswith("file://") else uri
                if not os.path.isfile(path):
                    return None, MISSING_FILE, f"missing file: {uri}"
        except OSError as e:
            return None, MISSING_FILE, f"cannot read {uri}: {e}"
        if os.path.getsize(path) == 0:
            return path, DECODE_ERROR, f"zero-byte file: {uri}"
        return path, None, None

    def _cleanup(self, *paths: str | None) -> None:
        for p in paths:
            if p and p.startswith(self.tmp):
                try:
                    os.remove(p)
                except OSError:
                    pass

    # ------------------------------------------------------------------------------------------ decode
    def _attempt(self, backend: str, video: str | None, audio: str | None, want_video: bool,
                 want_audio: bool) -> dict[str, Any]:
        try:
            return self.child.call("decode_clip", dict(video_path=video, audio_path=audio, backend=backend,
                                                       params=self.params, want_video=want_video,
                                                       want_audio=want_audio), self.timeout)
        except DecodeTimeout:
            self.timeouts += 1
            msg = f"{backend}: no answer within {self.timeout:g}s (decoder killed)"
            return {"timeout": msg, "video_error": msg, "audio_error": msg}
        except (ChildDied, RuntimeError) as e:
            msg = f"{backend}: decoder process failed: {e}"
            return {"video_error": msg, "audio_error": msg}

    def decode_one(self, video_uri: Any, audio_uri: Any = None) -> dict[str, Any]:
        """Decode one clip with timeout and fallback; returns the row's output columns."""
        self.clips += 1
        row: dict[str, Any] = {"frames": None, "decode_status": OK, "decode_error": None, "audio": None,
                               "audio_status": OK, "decode_backend": None}
        vpath, vstatus, vmsg = self._local(_uri(video_uri))
        apath, astatus, amsg = (None, None, None)
        if _uri(audio_uri) is not None:
            apath, astatus, amsg = self._local(_uri(audio_uri))
        try:
            if vstatus is not None:
                row["decode_status"], row["decode_error"] = vstatus, vmsg
                vpath = None
            errors: list[str] = []  # video decode failures
            aerrors: list[str] = []  # audio decode failures
            timed_out = False
            want_v, want_a = vpath is not None, (apath or vpath) is not None and astatus is None
            res: dict[str, Any] = {}
            for backend in [b for b in (self.backend, self.fallback) if b]:
                if not (want_v or want_a):
                    break
                r = self._attempt(backend, vpath, apath, want_v, want_a)
                timed_out |= "timeout" in r
                if want_v:
                    if "frames" in r:
                        res["frames"], row["decode_backend"], want_v = r["frames"], backend, False
                    elif "video_error" in r:
                        errors.append(r["video_error"])
                if want_a:
                    if "audio" in r or "no_audio" in r:
                        res.update({k: r[k] for k in ("audio", "no_audio") if k in r})
                        want_a = False
                    elif "audio_error" in r:
                        aerrors.append(r["audio_error"])
            if vpath is not None:
                if "frames" in res:
                    row["frames"] = res["frames"]
                    if row["decode_backend"] != self.backend:
                        self.fallbacks += 1
                        row["decode_error"] = "; ".join(errors) + f"; decoded with {row['decode_backend']}"
                else:
                    row["decode_status"] = DECODE_TIMEOUT if timed_out else DECODE_ERROR
                    row["decode_error"] = "; ".join(dict.fromkeys(errors)) or "video not decoded"
            # Audio status: the clip's own failure when nothing could be read, else no_audio / ok.
            if astatus is not None:
                row["audio_status"] = astatus
                row["decode_error"] = "; ".join(x for x in (row["decode_error"], amsg) if x)
            elif res.get("audio") is not None:
                row["audio"] = np.asarray(res["audio"], dtype=np.float32)
            elif "no_audio" in res:
                row["audio_status"] = NO_AUDIO
            else:
                row["audio_status"] = row["decode_status"] if row["decode_status"] != OK else DECODE_ERROR
                if row["decode_status"] == OK:
                    row["decode_error"] = "; ".join(x for x in (row["decode_error"], *aerrors) if x) or None
        finally:
            self._cleanup(vpath, apath)
        return row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["clip_id"])
        audio_uris = batch.get("audio_uri", [None] * n)
        rows = [self.decode_one(batch["video_uri"][i], audio_uris[i]) for i in range(n)]
        out = dict(batch)
        for name in self.output_columns:
            out[name] = object_column([r[name] for r in rows])
        return out

    def stats(self) -> dict[str, Any]:
        """Counters and the child's memory (for the bench's RSS measurement)."""
        return {"clips": self.clips, "fallbacks": self.fallbacks, "timeouts": self.timeouts,
                "child_restarts": self.child.restarts, "child_recycles": self.child.recycles,
                "child_rss": self.child.rss(), "actor_rss": _self_rss()}

    def __del__(self) -> None:
        try:
            self.child.kill()
            shutil.rmtree(self.tmp, ignore_errors=True)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _self_rss() -> int:
    from mer.extract.subproc import rss_bytes

    return rss_bytes(os.getpid())
