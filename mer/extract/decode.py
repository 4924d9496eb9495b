"""Decode stage: each clip is decoded ONCE (frames + 16 kHz audio); every encoder branch reads the result.

``ClipDecoder`` is a CPU ``map_batches`` callable class (never placed in a GPU actor). It owns a
persistent decode child process (:mod:`mer.extract.subproc`) so that a clip whose decode hangs is
abandoned after ``decode.timeout_s`` and retried with ``decode.fallback_backend``; the child is also
recycled every ``decode.recycle_every`` clips to bound decoder memory leaks. A batch's clips are queued in
the child back to back (it never idles for a round trip), and the stage's actors hold two batches at once
(``resources.max_concurrent_calls``) so Ray's block handling overlaps the decoding. Video is read with
``decode.backend``, audio with ``decode.audio_backend`` (PyAV: decord's AudioReader leaks every clip's
samples, which was the decode child's memory growth).

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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mer.config import MerConfig
from mer.extract.decoders import DecodeParams
from mer.extract.subproc import DecodeProcess, DecodeTimeout, rss_bytes
from mer.runtime.batches import object_column
from mer.store import storage

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


@dataclass
class _Clip:
    """One clip's decode in progress: its local inputs, what is still wanted, what came back."""

    video: str | None = None
    audio: str | None = None
    astatus: str | None = None  # the separate audio file's own failure (missing, zero-byte)
    amsg: str | None = None
    paths: tuple[str | None, ...] = ()
    want_v: bool = False
    want_a: bool = False
    timed_out: bool = False
    errors: list[str] = field(default_factory=list)  # video decode failures
    aerrors: list[str] = field(default_factory=list)  # audio decode failures
    res: dict[str, Any] = field(default_factory=dict)
    row: dict[str, Any] = field(default_factory=lambda: {
        "frames": None, "decode_status": OK, "decode_error": None, "audio": None, "audio_status": OK,
        "decode_backend": None})


class ClipDecoder:
    """``map_batches`` callable class: manifest rows → decoded frames, audio and statuses."""

    input_columns = ("clip_id", "video_uri")
    optional_inputs = ("audio_uri", "text")
    output_columns = ("frames", "decode_status", "decode_error", "audio", "audio_status", "decode_backend")
    process_class: type[DecodeProcess] = DecodeProcess  # the decode child's client (the tests run a double)

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
        self.audio_backend = d.audio_backend
        self.timeout = float(d.timeout_s)
        self.child = self.process_class(recycle_every=d.recycle_every, window=d.child_window,
                                        niceness=d.child_niceness)
        self.busy_s = 0.0
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
    def _prepare(self, video_uri: Any, audio_uri: Any) -> _Clip:
        self.clips += 1
        c = _Clip()
        c.video, vstatus, vmsg = self._local(_uri(video_uri))
        if _uri(audio_uri) is not None:
            c.audio, c.astatus, c.amsg = self._local(_uri(audio_uri))
        c.paths = (c.video, c.audio)
        if vstatus is not None:
            c.row["decode_status"], c.row["decode_error"] = vstatus, vmsg
            c.video = None
        c.want_v = c.video is not None
        c.want_a = (c.audio or c.video) is not None and c.astatus is None
        return c

    def _attempt(self, backend: str, audio_backend: str, clips: list[_Clip]) -> list[dict[str, Any]]:
        """One decode attempt of ``clips`` in the child (queued back to back); failures become messages."""
        requests = [dict(video_path=c.video, audio_path=c.audio, backend=backend, audio_backend=audio_backend,
                         params=self.params, want_video=c.want_v, want_audio=c.want_a) for c in clips]
        out: list[dict[str, Any]] = []
        for r in self.child.map("decode_clip", requests, self.timeout):
            if isinstance(r, DecodeTimeout):
                self.timeouts += 1
                msg = f"{backend}: no answer within {self.timeout:g}s (decoder killed)"
                out.append({"timeout": msg, "video_error": msg, "audio_error": msg})
            elif isinstance(r, Exception):
                msg = f"{backend}: decoder process failed: {r}"
                out.append({"video_error": msg, "audio_error": msg})
            else:
                out.append(r)
        return out

    @staticmethod
    def _merge(c: _Clip, backend: str, r: dict[str, Any]) -> None:
        c.timed_out |= "timeout" in r
        if c.want_v:
            if "frames" in r:
                c.res["frames"], c.row["decode_backend"], c.want_v = r["frames"], backend, False
            elif "video_error" in r:
                c.errors.append(r["video_error"])
        if c.want_a:
            if "audio" in r or "no_audio" in r:
                c.res.update({k: r[k] for k in ("audio", "no_audio") if k in r})
                c.want_a = False
            elif "audio_error" in r:
                c.aerrors.append(r["audio_error"])

    def _finish(self, c: _Clip) -> dict[str, Any]:
        row, res = c.row, c.res
        if c.video is not None:
            if "frames" in res:
                row["frames"] = res["frames"]
                if row["decode_backend"] != self.backend:
                    self.fallbacks += 1
                    row["decode_error"] = "; ".join(c.errors) + f"; decoded with {row['decode_backend']}"
            else:
                row["decode_status"] = DECODE_TIMEOUT if c.timed_out else DECODE_ERROR
                row["decode_error"] = "; ".join(dict.fromkeys(c.errors)) or "video not decoded"
        # Audio status: the clip's own failure when nothing could be read, else no_audio / ok.
        if c.astatus is not None:
            row["audio_status"] = c.astatus
            row["decode_error"] = "; ".join(x for x in (row["decode_error"], c.amsg) if x)
        elif res.get("audio") is not None:
            row["audio"] = np.asarray(res["audio"], dtype=np.float32)
        elif "no_audio" in res:
            row["audio_status"] = NO_AUDIO
        else:
            row["audio_status"] = row["decode_status"] if row["decode_status"] != OK else DECODE_ERROR
            if row["decode_status"] == OK:
                row["decode_error"] = "; ".join(x for x in (row["decode_error"], *c.aerrors) if x) or None
        return row

    def decode_rows(self, video_uris: Sequence[Any], audio_uris: Sequence[Any]) -> list[dict[str, Any]]:
        """Decode clips with timeout and fallback; one dict of output columns per clip.

        Each attempt sends all clips still missing a part to the child back to back (the first with
        ``backend`` and ``audio_backend``, then the fallback for what failed), so the child never idles
        between clips of a batch.
        """
        t0 = time.perf_counter()
        clips = [self._prepare(v, a) for v, a in zip(video_uris, audio_uris)]
        try:
            for k, backend in enumerate(b for b in (self.backend, self.fallback) if b):
                todo = [c for c in clips if c.want_v or c.want_a]
                if not todo:
                    break
                for c, r in zip(todo, self._attempt(backend, self.audio_backend if k == 0 else backend, todo)):
                    self._merge(c, backend, r)
            return [self._finish(c) for c in clips]
        finally:
            for c in clips:
                self._cleanup(*c.paths)
            self.busy_s += time.perf_counter() - t0

    def decode_one(self, video_uri: Any, audio_uri: Any = None) -> dict[str, Any]:
        """Decode one clip with timeout and fallback; returns the row's output columns."""
        return self.decode_rows([video_uri], [audio_uri])[0]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["clip_id"])
        rows = self.decode_rows(batch["video_uri"], batch.get("audio_uri", [None] * n))
        out = dict(batch)
        for name in self.output_columns:
            out[name] = object_column([r[name] for r in rows])
        return out

    def child_cpu_s(self) -> float:
        """CPU seconds of the decode children so far (the stage's timing adds them to the actor's)."""
        return self.child.cpu_s()

    def stats(self) -> dict[str, Any]:
        """Counters, CPU seconds (this process, the decode children) and memory (for the bench)."""
        return {"clips": self.clips, "fallbacks": self.fallbacks, "timeouts": self.timeouts,
                "child_restarts": self.child.restarts, "child_recycles": self.child.recycles,
                "busy_s": self.busy_s, "actor_cpu_s": time.process_time(), "child_cpu_s": self.child.cpu_s(),
                "child_rss": self.child.rss(), "actor_rss": rss_bytes(os.getpid())}

    def __del__(self) -> None:
        try:
            self.child.kill()
            shutil.rmtree(self.tmp, ignore_errors=True)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
