"""The training driver of the node-loss drill (``tests/test_drills.py``): what ``mer train`` runs
(:func:`mer.train.train_run` on a joined cluster), plus the drill's Ray Train callback, which kills the worker
node from fold 0's controller right after its epoch-2 report. Prints the run's metrics as one line of JSON.

``python tests/drill_train.py CONFIG STORE OUT MARKER NODE_PID``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import faults
import ray.cloudpickle

from mer.config import load_config
from mer.runtime.session import init_ray
from mer.train import train_run


def main(config: str, store: str, out: str, marker: str, node_pid: str) -> None:
    ray.cloudpickle.register_pickle_by_value(faults)
    cfg = init_ray(load_config(config))
    kill = faults.KillWorker(Path(marker), in_epoch=3, rank=0, fold=0, node_pid=int(node_pid))
    print(json.dumps(train_run(cfg, store, out, callbacks=[kill.callback()]), default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
