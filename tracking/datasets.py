"""A run's data as MLflow dataset inputs: the UI's *Dataset* column and the run page's inputs.

Each split's Parquet snapshot becomes one MLflow dataset: name ``wafers-<split>``,
digest = its data fingerprint (``provenance.data_fingerprint``, the same 16 hex digits the run's
``data_fingerprint`` tag holds for all splits together), source = where the files are, schema =
the Parquet columns, profile = row and file counts; the split is the input's context tag
(``mlflow.data.context``: train / val / test), which the UI shows beside the name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import pyarrow.parquet as pq
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from fcn_core.table import list_parquet_files, resolve_fs
from tracking.provenance import data_fingerprint
from tracking.store import RetryingClient

SOURCE_TYPE = "local"  # mlflow.data's name for a file-system source; the source is {"uri": ...}


def describe_split(name: str, path: str | os.PathLike) -> Dataset:
    """The MLflow dataset entity of one Parquet file or folder (rows counted from footers, not read)."""
    fs, files = list_parquet_files(path)
    rows = 0
    schema = None
    for f in files:
        with fs.open_input_file(f) as handle:
            meta = pq.ParquetFile(handle).metadata
            rows += meta.num_rows
            schema = schema or meta.schema.to_arrow_schema()
    columns = [{"name": field.name, "type": str(field.type), "required": not field.nullable}
               for field in (schema or [])]
    uri = str(path) if "://" in str(path) else resolve_fs(path)[1]
    return Dataset(name=name, digest=data_fingerprint([path]), source_type=SOURCE_TYPE,
                   source=json.dumps({"uri": uri}), schema=json.dumps({"mlflow_colspec": columns}),
                   profile=json.dumps({"num_rows": rows, "num_files": len(files)}))


def log_datasets(client: RetryingClient, run_id: str, splits: Mapping[str, str | os.PathLike], *,
                 prefix: str = "wafers") -> list[Dataset]:
    """Log each split's Parquet (``{"train": path, ...}``) as a dataset input of ``run_id``, named
    ``<prefix>-<split>`` with the split as context; returns the datasets logged."""
    datasets = [describe_split(f"{prefix}-{split}", path) for split, path in splits.items()]
    inputs = [DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)])
              for split, dataset in zip(splits, datasets, strict=True)]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    return datasets
