"""MLflow tracking for wafer-fcn: the store, runs, the model registry and provenance.

Modules: ``store`` (where the store is, one client per URI, lock retries), ``runs`` (parent and
stage runs, epoch metrics, system metrics), ``registry`` (weights-only scorer models, the
champion/challenger aliases, loading any model URI, the alias history), ``scores`` (test and real-map
scores per stage and as the stage ladder, calibrated thresholds), ``datasets`` (splits as dataset
inputs), ``nightly`` (the MLflow record of a nightly run) and ``provenance`` (data fingerprint, commit).
Nothing here imports Prefect; importing this package imports no MLflow (``wafer-fcn predict``
resolves a champion in an SQLite store without it).
"""
