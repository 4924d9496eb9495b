"""Hyper-parameter search with Ray Tune (``mer tune``): trials are k-fold ``mer train`` runs."""
