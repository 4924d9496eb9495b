"""Import the MER2025 (MER-SEMI) / MER2026 release layout into the project manifest.

Release layout (``root`` local or ``s3://``)::

    video/<name>.mp4 | .avi       the clips
    audio/<name>.wav              optional pre-extracted audio (used only with ``audio_dir=``)
    subtitle_chieng.csv           name,chinese,english
    track1_train_disdim.csv       name,discrete,valence   (MER2025)   | track1_train.csv  name,discrete (MER2026)
    track_all_candidates.csv      name                    (MER2025)   | track1_track2_candidate.csv (MER2026)
    track1_test_dis.csv / track1_test.csv / test_labels.csv   optional name,discrete of a labelled test split

Split rules: rows of the train CSV are ``train`` (labelled); names of the test-label CSV are ``test`` (with
their label); every other candidate is ``unlabeled``. A name in both train and test stays ``train`` and is
counted in ``overlap_train_test``. Text is the Chinese subtitle, falling back to the English one.

Decisions:

* **Every candidate keeps its row** (``keep_missing="candidates"``, the default): a candidate (split
  ``unlabeled`` or ``test``) whose video is missing stays in the manifest with ``video_status=missing_file``
  and the ``video_uri`` the clip would have, so extraction gives it text (and, with ``audio_dir``, audio)
  features with its video branches marked ``missing_file``, scoring predicts from what is there, and the
  submission has one row per candidate (the official evaluation requires every one). A labelled ``train``
  row without a video is dropped: its subtitle alone is a weaker training example than the videos the
  model is trained to fuse. ``keep_missing="all"`` keeps those too, ``"none"`` drops every missing one.
  Every missing video is *reported* either way: the summary counts them per split and
  ``<out>.missing.csv`` (``name,split,label,reason,kept``) lists every one.
* **Unknown labels raise** a :class:`ValueError` naming the CSV, its line number, the clip and the label
  (``on_unknown_label="error"``, the default: a label the schema does not know is a release/contract
  problem, not a per-clip one). ``on_unknown_label="skip"`` drops those rows instead and lists them in
  ``<out>.unknown_labels.csv``. Known spellings are normalised first (case, whitespace, ``worry`` →
  ``worried``, ``surprised`` → ``surprise``, ``happiness`` → ``happy``...). A train row with an empty
  label becomes ``unlabeled``.
"""

from __future__ import annotations

import csv
import io
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from mer.config import LABELS
from mer.data.manifest import manifest_from_rows, write_manifest
from mer.store import storage

# A kept row whose video was not found (the extraction stage gives its video branches the same status).
MISSING_FILE = "missing_file"
KEEP_MISSING: tuple[str, ...] = ("candidates", "all", "none")
TRAIN_CSVS: tuple[str, ...] = ("track1_train_disdim.csv", "track1_train.csv")
CANDIDATE_CSVS: tuple[str, ...] = ("track_all_candidates.csv", "track1_track2_candidate.csv")
TEST_CSVS: tuple[str, ...] = ("track1_test_dis.csv", "track1_test.csv", "test_labels.csv")
LABEL_COLUMNS: tuple[str, ...] = ("discrete", "label", "emotion", "emo")
# Spellings seen in MER releases and papers (lower-cased before lookup).
LABEL_ALIASES: dict[str, str] = {
    "worry": "worried", "worries": "worried", "anxious": "worried", "fear": "worried", "fearful": "worried",
    "surprised": "surprise", "surprising": "surprise",
    "happiness": "happy", "happy": "happy", "joy": "happy",
    "anger": "angry", "sadness": "sad", "neutrality": "neutral", "calm": "neutral",
}


def normalise_label(value: Any) -> str | None:
    """Map a release label to :data:`mer.config.LABELS` (None for empty); unknown labels come back as given,
    stripped, so the caller can report them."""
    if value is None:
        return None
    s = str(value).strip()
    if not s or s.lower() in ("nan", "none", "null"):
        return None
    low = s.lower()
    if low in LABELS:
        return low
    return LABEL_ALIASES.get(low, s)


def _resolve(root: str, name: str) -> str:
    """``name`` as is when it is an absolute path or URI, else relative to ``root``."""
    if storage.is_s3(name) or name.startswith("/"):
        return name
    return storage.join(root, name)


def _read_csv(uri: str) -> pa.Table:
    """A release CSV with every column read as text (names like 00012 and labels must not be converted)."""
    data = storage.read_bytes(uri)
    first = data.lstrip(b"\xef\xbb\xbf").split(b"\n", 1)[0].decode("utf-8", errors="replace")
    header = next(csv.reader([first]), [])
    return pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
        strings_can_be_null=True, column_types={c.strip(): pa.string() for c in header}))


def _first_existing(root: str, given: str | None, candidates: tuple[str, ...], what: str, required: bool
                    ) -> str | None:
    if given:
        uri = _resolve(root, given)
        if not storage.exists(uri):
            raise FileNotFoundError(f"{what} CSV not found: {uri}")
        return uri
    for name in candidates:
        uri = storage.join(root, name)
        if storage.exists(uri):
            return uri
    if required:
        raise FileNotFoundError(f"no {what} CSV under {root} (looked for {list(candidates)})")
    return None


def _labelled(uri: str, on_unknown: str, unknown_rows: list[dict[str, Any]]) -> tuple[list[tuple[str, str | None]], int]:
    """(name, label) rows of a labelled CSV, labels normalised; returns also the number of aliased labels."""
    t = _read_csv(uri)
    if "name" not in t.column_names:
        raise ValueError(f"{uri}: needs a 'name' column (has {t.column_names})")
    col = next((c for c in LABEL_COLUMNS if c in t.column_names), None)
    if col is None:
        raise ValueError(f"{uri}: needs a label column, one of {list(LABEL_COLUMNS)} (has {t.column_names})")
    out: list[tuple[str, str | None]] = []
    n_alias = 0
    for i, (name, raw) in enumerate(zip(t.column("name").to_pylist(), t.column(col).to_pylist())):
        if name is None or not str(name).strip():
            continue
        name = str(name).strip()
        lab = normalise_label(raw)
        if lab is not None and lab not in LABELS:
            row = {"csv": uri, "line": i + 2, "name": name, "label": str(raw)}  # +2: header, 1-based lines
            if on_unknown == "error":
                raise ValueError(f"{uri} line {i + 2}: clip {name!r} has unknown label {raw!r} "
                                 f"(known: {list(LABELS)} and aliases {sorted(LABEL_ALIASES)})")
            unknown_rows.append(row)
            continue
        n_alias += lab is not None and str(raw).strip() != lab
        out.append((name, lab))
    return out, n_alias


def _video_index(video_root: str, exts: tuple[str, ...]) -> dict[str, str]:
    """name -> video URI from one directory listing (one LIST instead of one HEAD per clip on S3); the
    earlier extension in ``exts`` wins when a clip exists twice."""
    index: dict[str, str] = {}
    rank: dict[str, int] = {}
    for uri in storage.list_files(video_root):
        base = posixpath.basename(uri) if storage.is_s3(uri) else uri.rsplit("/", 1)[-1]
        for k, ext in enumerate(exts):
            if base.lower().endswith(ext):
                name = base[: -len(ext)]
                if name not in rank or k < rank[name]:
                    index[name], rank[name] = uri, k
                break
    return index


def _write_report(uri: str, header: list[str], rows: list[dict[str, Any]]) -> None:
    cols = {h: pa.array([None if r.get(h) is None else str(r.get(h)) for r in rows], pa.string()) for h in header}
    buf = io.BytesIO()
    pacsv.write_csv(pa.table(cols), buf)
    storage.write_bytes(uri, buf.getvalue())


def _strip_suffix(uri: str) -> str:
    for suf in (".parquet", ".csv"):
        if uri.lower().endswith(suf):
            return uri[: -len(suf)]
    return uri


def import_mer2025(root: str, out_uri: str, video_dir: str = "video", *, train_csv: str | None = None,
                   candidates_csv: str | None = None, subtitle_csv: str = "subtitle_chieng.csv",
                   test_labels: str | bool | None = None, audio_dir: str | None = None,
                   video_exts: tuple[str, ...] = (".mp4", ".avi"), keep_missing: str = "candidates",
                   check_files: bool = True, on_unknown_label: str = "error") -> dict[str, Any]:
    """Turn a MER2025/MER2026 release under ``root`` into the project manifest at ``out_uri`` (Parquet, or
    CSV when it ends in ``.csv``); see the module docstring for the split rules and decisions.

    ``train_csv``/``candidates_csv``/``test_labels`` default to the release names (MER2025 first, then
    MER2026); ``test_labels=False`` disables the test split. ``video_dir``/``audio_dir`` are relative to
    ``root`` unless absolute. ``check_files=False`` skips the video listing (every clip is assumed present,
    as ``<video_dir>/<name><video_exts[0]>``). ``keep_missing``: which rows without a video stay
    (``candidates``: the ``unlabeled`` and ``test`` ones; ``all``; ``none``).

    Returns a summary: rows per split, labels of the train split, missing videos (count, per split, report
    URI), text sources, the CSVs used.
    """
    if on_unknown_label not in ("error", "skip"):
        raise ValueError("on_unknown_label must be 'error' or 'skip'")
    if keep_missing not in KEEP_MISSING:
        raise ValueError(f"keep_missing must be one of {list(KEEP_MISSING)}, not {keep_missing!r}")
    root = str(root).rstrip("/")
    out_uri = str(out_uri)
    unknown: list[dict[str, Any]] = []
    train_uri = _first_existing(root, train_csv, TRAIN_CSVS, "train label", required=False)
    cand_uri = _first_existing(root, candidates_csv, CANDIDATE_CSVS, "candidates", required=False)
    if train_uri is None and cand_uri is None:
        raise FileNotFoundError(f"{root}: neither a train CSV {list(TRAIN_CSVS)} nor a candidates CSV "
                                f"{list(CANDIDATE_CSVS)} found")
    test_uri = None
    if test_labels is not False:
        test_uri = _first_existing(root, test_labels if isinstance(test_labels, str) else None, TEST_CSVS,
                                   "test label", required=False)

    train_rows, n_alias = _labelled(train_uri, on_unknown_label, unknown) if train_uri else ([], 0)
    test_rows, n_alias_t = _labelled(test_uri, on_unknown_label, unknown) if test_uri else ([], 0)
    candidates: list[str] = []
    if cand_uri:
        t = _read_csv(cand_uri)
        if "name" not in t.column_names:
            raise ValueError(f"{cand_uri}: needs a 'name' column (has {t.column_names})")
        candidates = [str(n).strip() for n in t.column("name").to_pylist() if n is not None and str(n).strip()]

    # Order: train, then test, then the rest of the candidates; first occurrence of a name wins.
    entries: dict[str, tuple[str, str | None]] = {}
    n_dup = 0
    for name, lab in train_rows:
        if name in entries:
            n_dup += 1
            continue
        entries[name] = ("train", lab) if lab is not None else ("unlabeled", None)
    n_train_unlabelled = sum(1 for _, lab in train_rows if lab is None)
    overlap = 0
    for name, lab in test_rows:
        if name in entries:
            overlap += entries[name][0] == "train"
            continue
        if lab is None:
            entries[name] = ("unlabeled", None)
        else:
            entries[name] = ("test", lab)
    for name in candidates:
        entries.setdefault(name, ("unlabeled", None))

    texts: dict[str, tuple[str | None, str]] = {}
    text_source = {"chinese": 0, "english": 0, "none": 0}
    sub_uri = _resolve(root, subtitle_csv)
    if storage.exists(sub_uri):
        t = _read_csv(sub_uri)
        if "name" not in t.column_names:
            raise ValueError(f"{sub_uri}: needs a 'name' column (has {t.column_names})")
        zh = t.column("chinese").to_pylist() if "chinese" in t.column_names else [None] * t.num_rows
        en = t.column("english").to_pylist() if "english" in t.column_names else [None] * t.num_rows
        for name, c, e in zip(t.column("name").to_pylist(), zh, en):
            if name is None:
                continue
            c = c.strip() if isinstance(c, str) else None
            e = e.strip() if isinstance(e, str) else None
            texts[str(name).strip()] = (c, "chinese") if c else ((e, "english") if e else (None, "none"))

    video_root = _resolve(root, video_dir)
    index = _video_index(video_root, tuple(x.lower() for x in video_exts)) if check_files else {}
    audio_index: dict[str, str] = {}
    if audio_dir:
        audio_index = _video_index(_resolve(root, audio_dir), (".wav",))

    rows: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    for name, (split, lab) in entries.items():
        uri = index.get(name) if check_files else storage.join(video_root, name + video_exts[0])
        status = "ok"
        if uri is None:
            kept = keep_missing == "all" or (keep_missing == "candidates" and split != "train")
            missing.append({"name": name, "split": split, "label": lab, "reason": "video file not found",
                            "kept": kept})
            if not kept:
                continue
            uri, status = storage.join(video_root, name + video_exts[0]), MISSING_FILE
        text, source = texts.get(name, (None, "none"))
        text_source[source] += 1
        rows.append({"clip_id": name, "video_uri": uri, "audio_uri": audio_index.get(name), "text": text,
                     "label": lab, "split": split, "video_status": status})

    base = _strip_suffix(out_uri)
    missing_uri = f"{base}.missing.csv"
    _write_report(missing_uri, ["name", "split", "label", "reason", "kept"], missing)
    unknown_uri = None
    if unknown:
        unknown_uri = f"{base}.unknown_labels.csv"
        _write_report(unknown_uri, ["csv", "line", "name", "label"], unknown)
    table = manifest_from_rows(rows)
    table = write_manifest(table.append_column("video_status", pa.array([r["video_status"] for r in rows],
                                                                         pa.string())), out_uri)

    splits = table.column("split").to_pylist()
    labels = table.column("label").to_pylist()
    per_split_missing: dict[str, int] = {}
    for m in missing:
        per_split_missing[m["split"]] = per_split_missing.get(m["split"], 0) + 1
    return {
        "manifest": out_uri, "n_rows": table.num_rows,
        "splits": {s: splits.count(s) for s in ("train", "unlabeled", "test")},
        "train_labels": {lab: sum(1 for s, la in zip(splits, labels) if s == "train" and la == lab) for lab in LABELS},
        "n_missing_video": len(missing), "missing_by_split": per_split_missing, "missing_report": missing_uri,
        "n_missing_kept": sum(1 for m in missing if m["kept"]),
        "n_unknown_label": len(unknown), "unknown_label_report": unknown_uri,
        "n_aliased_labels": n_alias + n_alias_t, "n_train_without_label": n_train_unlabelled,
        "n_duplicate_train_rows": n_dup, "overlap_train_test": overlap, "text_source": text_source,
        "train_csv": train_uri, "candidates_csv": cand_uri, "test_csv": test_uri,
        "subtitle_csv": sub_uri if storage.exists(sub_uri) else None,
    }
