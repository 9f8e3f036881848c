"""MLflow tracking for wafer-fcn: the store, runs, the model registry and provenance.

Modules: ``store`` (where the store is, one client per URI, lock retries), ``runs`` (parent and
stage runs, epoch metrics, system metrics), ``registry`` (weights-only scorer models, the
champion/challenger aliases, loading any model URI) and ``provenance`` (data fingerprint, commit).
Nothing here imports Prefect; importing this package imports no MLflow (``wafer-fcn predict``
resolves a champion in an SQLite store without it).
"""
