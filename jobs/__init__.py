"""``ray job submit`` entry points: one module per job, each a thin wrapper over the ``mer`` CLI.

``ray job submit --working-dir . -- python -m jobs.<name> --config ray_config.yaml ...`` runs the same
library function as ``mer <name> ...``; the job joins the cluster it was submitted to (RAY_ADDRESS) and
logs its resolved config (secrets redacted) before starting.
"""
