"""The layout of a run directory, owned here so that training, scoring, ensembles and the label loop agree.

A training run (``mer train``, ``mer ensemble``) holds ``models/model.json`` (its fold models, and the
provenance of the store it was trained on under ``features``) and ``metrics.json``. A label-loop directory
(``mer pseudolabel``) holds ``loop.json``, whose ``best`` names the run to score; an ablation directory
(``mer ablation``) holds ``selection.json``, whose ``run`` is the candidate it ships.
"""

from __future__ import annotations

from typing import Any

from mer.store import storage

LOOP_FILE = "loop.json"
# What a directory of candidate runs (``mer ablation``) ships: the selection record names the run to score.
SELECTION_FILE = "selection.json"
MODEL_FILE = ("models", "model.json")


def model_file(run_uri: str) -> str:
    """Where a run's model spec is (``models/model.json``)."""
    return storage.join(run_uri, *MODEL_FILE)


def best_run(uri: str) -> tuple[str, dict[str, Any] | None]:
    """The run to score for ``uri``: ``uri`` itself when it is a training run; for a label-loop directory its
    ``best`` (the accepted stages' ensemble, or the best accepted stage: ``labels.final``). Anything else
    raises, naming what was expected."""
    if storage.exists(model_file(uri)):
        return uri, None
    loop_file = storage.join(uri, LOOP_FILE)
    if storage.exists(loop_file):
        loop = storage.read_json(loop_file)
        return loop["best"]["run"], loop["best"]
    selection_file = storage.join(uri, SELECTION_FILE)
    if storage.exists(selection_file):
        selection = storage.read_json(selection_file)
        return selection["run"], selection
    raise FileNotFoundError(f"{uri} is not a training run (no models/model.json), a label-loop directory "
                            f"(no {LOOP_FILE}) nor an ablation directory (no {SELECTION_FILE})")


def run_record(run_uri: str) -> dict[str, Any] | None:
    """The provenance a run recorded of the store it was trained on; ``None`` for runs that predate it."""
    return storage.read_json(model_file(run_uri)).get("features")


def run_id(run_uri: str) -> str:
    """A run's name in predictions: the ``run_name`` its metrics record, else its directory name."""
    metrics = storage.join(run_uri, "metrics.json")
    name = storage.read_json(metrics).get("run_name") if storage.exists(metrics) else None
    return str(name or run_uri.rstrip("/").rsplit("/", 1)[-1])


def common_store(run_uris: list[str], what: str) -> str:
    """The feature store every run of ``run_uris`` was trained on (their ``metrics.json`` ``features``); raises,
    naming ``what`` combines them, when they differ or a run records none."""
    stores = {storage.read_json(storage.join(r, "metrics.json")).get("features") for r in run_uris}
    if len(stores) != 1 or None in stores:
        raise ValueError(f"{what}: runs {run_uris} were trained on different feature stores "
                         f"{sorted(map(str, stores))}")
    return stores.pop()
