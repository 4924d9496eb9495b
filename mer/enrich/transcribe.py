"""Speech recognition in the extraction stream: the decode actor's audio → a Whisper-family model → the clip's
transcript (``text.source: asr | auto``; ``extract.asr``).

:class:`Transcriber` is a ``map_batches`` callable class placed after decode, before the text encoder (and the
visual-description stage, which may read the transcript as context). Per row:

* ``text.source: auto`` and a non-empty subtitle: kept (``asr_status=subtitle``), nothing sent to the engine;
* no audio (``no_audio``, a decode failure: its status), or audio quieter than ``silence_rms`` (``silence``):
  not sent either;
* a cached transcript of the same audio (same model and settings): reused;
* otherwise the first 30-s window goes to a language-detection request (Whisper's first decoder step after
  ``<|startoftranscript|>``, constrained to the language tokens and ``<|nospeech|>``; ``non_speech`` when that
  wins), then every window (``window_s``; a clip is cut up to ``max_seconds``) to a transcription request in the
  detected (or configured) language, and the window texts are joined. An answer with a decoding loop or no words
  is ``garbled``, an empty one ``empty_output``; an engine failure is ``error`` with its message (only that row).

The row's ``text`` becomes the transcript it will be known by (the subtitle, the ASR text, or empty), with
``transcript_source`` (``subtitle``/``asr``/``none``), ``asr_status``, ``asr_language`` and ``asr_error``.
Engines: :mod:`mer.enrich.engine` (vLLM, or transformers' ``generate``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import numpy as np

from mer.config import MerConfig
from mer.enrich import guard
from mer.enrich.cache import GeneratedTextCache
from mer.enrich.engine import request_error, sampling_params, texts_and_tokens, vllm_engine
from mer.models.registry import load_model, load_processor, pick_device, resolve_model_id, slot_spec
from mer.runtime.batches import isolate_rows, object_column

log = logging.getLogger("mer.asr")

SUBTITLE = "subtitle"  # asr_status of a row that kept its subtitle (text.source auto)
SILENCE = "silence"
NON_SPEECH = "non_speech"
CACHEABLE = frozenset({guard.OK, guard.EMPTY_OUTPUT, guard.GARBLED, NON_SPEECH})
NO_SPEECH_TOKEN = "<|nospeech|>"
# Languages written without spaces between words: their windows are joined without one.
_UNSPACED = frozenset({"zh", "ja", "yue", "th", "lo", "my", "bo"})


def asr_settings_hash(cfg: MerConfig) -> str:
    """What decides a transcript besides the audio: model, backend, language, windows, decoding, the garble test."""
    a = cfg.extract.asr
    spec = slot_spec(cfg, "asr")
    blob = {"model": spec.model_id, "revision": spec.revision, "backend": a.backend, "language": a.language,
            "window_s": a.window_s, "max_seconds": a.max_seconds, "max_tokens": a.max_tokens,
            "temperature": a.temperature, "top_p": a.top_p, "seed": a.seed,
            "max_compression_ratio": a.max_compression_ratio}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def audio_sha(wave: np.ndarray, sample_rate: int) -> str:
    """Hash of a waveform (float32 samples and rate): the cache key of its transcript."""
    h = hashlib.sha256(np.ascontiguousarray(wave, dtype=np.float32).tobytes())
    h.update(str(sample_rate).encode())
    return h.hexdigest()[:16]


def windows(wave: np.ndarray, sample_rate: int, window_s: float) -> list[np.ndarray]:
    """Consecutive ``window_s`` pieces of ``wave``, the last one shorter. A tail under 0.5 s after a full window
    is dropped: too short to hold a word, and Whisper tends to invent text for a window that is nearly all
    padding (it cannot join the window before it, which the model would cut at 30 s)."""
    step = int(window_s * sample_rate)
    pieces = [wave[i:i + step] for i in range(0, len(wave), step)] or [wave]
    if len(pieces) > 1 and len(pieces[-1]) < sample_rate // 2:
        pieces.pop()
    return pieces


def join_windows(texts: list[str], language: str | None) -> str:
    """The windows' texts as one transcript (no space between them in languages written without spaces)."""
    sep = "" if language in _UNSPACED else " "
    return sep.join(t.strip() for t in texts if t.strip())


def _text(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and v != v) else str(v).strip()


class VllmWhisper:
    """Whisper on a vLLM engine: one request per window; the audio goes as ``multi_modal_data={"audio": (samples,
    rate)}`` with the decoder prompt as the request's text (vLLM's encoder-decoder processor puts the audio in the
    encoder)."""

    def __init__(self, cfg: MerConfig, path: str) -> None:
        a = cfg.extract.asr
        self.llm = vllm_engine(path, a, slot_spec(cfg, "asr"), {"audio": 1})
        self.tokenizer = self.llm.get_tokenizer()
        self.stage, self.rate = a, int(cfg.extract.decode.audio_sample_rate)

    def token_id(self, token: str) -> int | None:
        """The id of a special token, None when the model's vocabulary lacks it."""
        i = self.tokenizer.convert_tokens_to_ids(token)
        return None if i is None or i == getattr(self.tokenizer, "unk_token_id", -1) else int(i)

    def detect(self, pieces: list[np.ndarray], candidates: dict[int, str]) -> list[str]:
        """The most likely of ``candidates`` (token id → name) after ``<|startoftranscript|>``, per piece."""
        params = sampling_params(self.stage, temperature=0.0, max_tokens=1, allowed_token_ids=list(candidates))
        outs = self.llm.generate([{"prompt": "<|startoftranscript|>", "multi_modal_data": {"audio": (p, self.rate)}}
                                  for p in pieces], params, use_tqdm=False)
        names = []
        for o in outs:
            err = request_error(o)
            if err:
                raise RuntimeError(err)
            names.append(candidates.get(int(o.outputs[0].token_ids[0]), "") if o.outputs[0].token_ids else "")
        return names

    def transcribe(self, pieces: list[np.ndarray], languages: list[str]) -> list[tuple[str, int]]:
        """(text, generated tokens) of each piece, transcribed in its language."""
        prompts = [{"prompt": f"<|startoftranscript|><|{lang}|><|transcribe|><|notimestamps|>",
                    "multi_modal_data": {"audio": (p, self.rate)}} for p, lang in zip(pieces, languages)]
        outs = self.llm.generate(prompts, sampling_params(self.stage), use_tqdm=False)
        return texts_and_tokens(outs)


class TransformersWhisper:
    """The same requests on transformers' ``WhisperForConditionalGeneration`` (the CPU fallback, ``backend:
    transformers``): detection from the logits of the first decoder step, transcription with ``generate``."""

    def __init__(self, cfg: MerConfig, path: str) -> None:
        import torch  # the transformers backend only: the vLLM one never loads torch models itself

        spec, a = slot_spec(cfg, "asr"), cfg.extract.asr
        self.torch = torch
        self.device = pick_device(a.resources.num_gpus)
        self.processor = load_processor(spec, cfg)
        self.tokenizer = self.processor.tokenizer
        self.model = load_model(spec, cfg, device=self.device, dtype=a.resources.dtype)
        self.stage, self.rate = a, int(cfg.extract.decode.audio_sample_rate)

    def token_id(self, token: str) -> int | None:
        i = self.tokenizer.convert_tokens_to_ids(token)
        return None if i is None or i == self.tokenizer.unk_token_id else int(i)

    def _features(self, pieces: list[np.ndarray]) -> Any:
        feats = self.processor.feature_extractor(pieces, sampling_rate=self.rate, return_tensors="pt")
        return feats["input_features"].to(self.device)

    def detect(self, pieces: list[np.ndarray], candidates: dict[int, str]) -> list[str]:
        torch = self.torch
        feats = self._features(pieces)
        sot = self.token_id("<|startoftranscript|>")
        start = torch.full((len(pieces), 1), sot, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            logits = self.model(input_features=feats, decoder_input_ids=start).logits[:, -1]
        ids = list(candidates)
        best = logits[:, ids].argmax(dim=-1).tolist()
        return [candidates[ids[b]] for b in best]

    def transcribe(self, pieces: list[np.ndarray], languages: list[str]) -> list[tuple[str, int]]:
        torch = self.torch
        out: list[tuple[str, int]] = []
        for lang in dict.fromkeys(languages):  # generate takes one language per call
            rows = [i for i, x in enumerate(languages) if x == lang]
            kwargs: dict[str, Any] = {"max_new_tokens": self.stage.max_tokens, "language": lang, "task": "transcribe"}
            if self.stage.temperature > 0:
                torch.manual_seed(self.stage.seed)
                kwargs.update(do_sample=True, temperature=self.stage.temperature, top_p=self.stage.top_p)
            with torch.inference_mode():
                seqs = self.model.generate(input_features=self._features([pieces[i] for i in rows]), **kwargs)
            for i, seq in zip(rows, seqs.tolist()):
                text_ids = [t for t in seq if t < len(self.tokenizer) and t not in self.tokenizer.all_special_ids]
                out.append((i, self.tokenizer.decode(text_ids, skip_special_tokens=True), len(text_ids)))
        return [(text, n) for _, text, n in sorted(out)]


class Transcriber:
    """``map_batches`` callable class: decoded audio → transcripts (see the module docstring)."""

    input_columns = ("clip_id", "audio", "audio_status")
    optional_inputs = ("text",)
    output_columns = ("text", "transcript_source", "asr_status", "asr_language", "asr_error")

    def __init__(self, cfg: MerConfig, cache_dir: str | None = None) -> None:
        self.cfg, self.stage = cfg, cfg.extract.asr
        self.source = cfg.text.source
        self.rate = int(cfg.extract.decode.audio_sample_rate)
        self.max_samples = int(self.stage.max_seconds * self.rate)
        spec = slot_spec(cfg, "asr")
        self.model_id = spec.model_id
        self.path = str(resolve_model_id(spec, cfg))
        self.cache = GeneratedTextCache(cache_dir, self.model_id, asr_settings_hash(cfg)) if cache_dir else None
        self.hits = self.cache.lookup() if self.cache else {}
        self.engine: VllmWhisper | TransformersWhisper | None = None  # built on the first row that needs it
        self.batch_tokens = 0  # tokens the last call generated (the timing wrapper reports them)

    def _engine(self) -> VllmWhisper | TransformersWhisper:
        if self.engine is None:
            t0 = time.perf_counter()
            cls = VllmWhisper if self.stage.backend == "vllm" else TransformersWhisper
            self.engine = cls(self.cfg, self.path)
            log.info("asr: %s engine for %s ready in %.1f s", self.stage.backend, self.model_id,
                     time.perf_counter() - t0)
        return self.engine

    def _languages(self, engine: Any, rows: list[int], pieces: dict[int, list[np.ndarray]],
                   errors: dict[int, str]) -> dict[int, str]:
        """Row → language code, or ``NON_SPEECH``; the configured language when set."""
        if self.stage.language:
            return {r: self.stage.language for r in rows}
        # transformers is loaded by the engine already; imported here so the module stays light to import
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        candidates = {i: c for c in LANGUAGES if (i := engine.token_id(f"<|{c}|>")) is not None}
        if (ns := engine.token_id(NO_SPEECH_TOKEN)) is not None:
            candidates[ns] = NON_SPEECH
        if not candidates:
            raise ValueError(f"{self.model_id}: its tokenizer has no Whisper language tokens; set extract.asr.language")

        def detect(chunk: list[int]) -> dict[int, str]:
            return dict(zip(chunk, engine.detect([pieces[r][0] for r in chunk], candidates)))

        return isolate_rows(rows, detect, errors, "asr: language detection")

    def _generate(self, rows: list[int], waves: dict[int, np.ndarray], errors: dict[int, str]
                  ) -> dict[int, tuple[str, str | None, str, int]]:
        """Row → (text, language, status, tokens) for the rows sent to the engine."""
        engine = self._engine()
        pieces = {r: windows(waves[r], self.rate, self.stage.window_s) for r in rows}
        langs = self._languages(engine, rows, pieces, errors)
        out: dict[int, tuple[str, str | None, str, int]] = {}
        speech = [r for r in rows if r in langs and langs[r] != NON_SPEECH]
        out.update({r: ("", None, NON_SPEECH, 0) for r in rows if langs.get(r) == NON_SPEECH})

        def transcribe(chunk: list[int]) -> dict[int, tuple[str, str | None, str, int]]:
            flat = [(r, p) for r in chunk for p in pieces[r]]
            answers = engine.transcribe([p for _, p in flat], [langs[r] for r, _ in flat])
            res: dict[int, tuple[str, str | None, str, int]] = {}
            for r in chunk:
                mine = [a for (rr, _), a in zip(flat, answers) if rr == r]
                raw = join_windows([t for t, _ in mine], langs[r])
                text, status = guard.media_text(raw, 100_000, self.stage.max_compression_ratio)
                res[r] = (text, langs[r], status, sum(n for _, n in mine))
            return res

        out.update(isolate_rows(speech, transcribe, errors, "asr"))
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = list(batch["clip_id"])
        n = len(ids)
        subtitles = [_text(v) for v in batch.get("text", [None] * n)]
        audio, astat = list(batch["audio"]), list(batch["audio_status"])
        text, source, status = list(subtitles), ["none"] * n, [""] * n
        language: list[str | None] = [None] * n
        errors: dict[int, str] = {}
        waves: dict[int, np.ndarray] = {}
        shas: dict[int, str] = {}
        for i in range(n):
            if self.source == "auto" and subtitles[i]:
                source[i], status[i] = SUBTITLE, SUBTITLE
                continue
            text[i] = ""
            a = audio[i]
            if a is None or not isinstance(a, np.ndarray) or a.size == 0:
                status[i] = _text(astat[i]) if _text(astat[i]) not in ("", guard.OK) else "no_audio"
                continue
            w = np.asarray(a, dtype=np.float32).reshape(-1)[: self.max_samples]
            if not np.isfinite(w).all():
                status[i], errors[i] = guard.ERROR, "asr: non-finite audio samples"
                continue
            if float(np.sqrt(np.mean(np.square(w, dtype=np.float64)))) < self.stage.silence_rms:
                status[i] = SILENCE
                continue
            shas[i] = audio_sha(w, self.rate)
            if shas[i] in self.hits:
                cached, lang, st = self.hits[shas[i]]
                text[i], language[i], status[i] = (cached, lang, st)
            else:
                waves[i] = w
        generated = self._generate(sorted(waves), waves, errors) if waves else {}
        new_rows = []
        self.batch_tokens = 0
        for i, (t, lang, st, ntok) in generated.items():
            text[i], language[i], status[i] = t, lang, st
            self.batch_tokens += ntok
            if st in CACHEABLE:
                new_rows.append({"clip_id": str(ids[i]), "input_sha": shas[i], "text": t, "language": lang,
                                 "status": st, "num_tokens": ntok})
                self.hits[shas[i]] = (t, lang, st)
        for i in errors:
            status[i], text[i] = guard.ERROR, ""
        if self.cache is not None and new_rows:
            self.cache.write(new_rows)
        for i in range(n):
            if source[i] == SUBTITLE:
                continue
            if status[i] == guard.OK and text[i]:
                source[i] = "asr"
            else:
                text[i] = ""  # a garbled or failed transcript is not the clip's text
        out = dict(batch)
        out["text"] = object_column(text)
        out["transcript_source"] = object_column(source)
        out["asr_status"] = object_column(status)
        out["asr_language"] = object_column([lang or "" for lang in language])
        out["asr_error"] = object_column([errors.get(i) for i in range(n)])
        return out
