"""The environment of one machine: where the project home, the tracking store and the real maps are.

Everything a deployment sets through environment variables is read here, and only here, by
pydantic-settings; what a model is and how it trains lives in the YAML config (``fcn_core.config``).
Reading has no side effects: nothing here writes to ``os.environ``. ``settings()`` reads the
environment afresh on each call, so a variable set after import (a test, a worker) is honoured.

    WAFER_FCN_HOME        project data dir (store, MLflow database, predictions); default ./var
    MLFLOW_TRACKING_URI   tracking store, preferred over the home's SQLite file (MLflow's own name)
    WAFER_FCN_REAL_DATA   folder of the real labelled maps (wm811k-val.parquet, ...);
                          default ../shared/data beside the checkout, when it exists
    WAFER_FCN_TIMEZONE    IANA time zone of the nightly schedule (read by prefect.yaml at deploy time)
    WAFER_FCN_MLFLOW_UI   address of a running MLflow UI, for links in reports
"""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# A checkout keeps the shared real data beside it: <parent>/<checkout>/ and <parent>/shared/data/.
CHECKOUT_ROOT = Path(__file__).resolve().parent.parent
CHECKOUT_REAL_DATA = CHECKOUT_ROOT.parent / "shared" / "data"
REAL_VALIDATION_MAPS = "wm811k-val.parquet"  # the labelled WM-811K maps every training is scored on


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WAFER_FCN_", env_ignore_empty=True, extra="ignore",
                                      frozen=True)

    home: Path | None = Field(None, description="project data dir; None: ./var")
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI"),
        description="tracking store preferred over the home's SQLite file (unless the config names one)")
    real_data: Path | None = Field(
        None, description="folder of the real labelled maps; None: ../shared/data beside the checkout")
    timezone: str = Field("UTC", description="IANA time zone of the nightly schedule")
    mlflow_ui: str | None = Field(None, description="address of a running MLflow UI, e.g. http://127.0.0.1:5000")

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"WAFER_FCN_TIMEZONE={name!r} is not an IANA time zone (e.g. Europe/Berlin)") from None
        return name

    def home_dir(self) -> Path:
        """The project home, absolute: $WAFER_FCN_HOME, else ./var of the current directory."""
        return (self.home or Path("var")).expanduser().resolve()

    def real_data_dir(self) -> Path | None:
        """$WAFER_FCN_REAL_DATA as given (even when absent: the caller says what is missing), else the
        checkout's ../shared/data when that folder exists, else None."""
        if self.real_data is not None:
            return self.real_data.expanduser()
        return CHECKOUT_REAL_DATA if CHECKOUT_REAL_DATA.is_dir() else None

    def real_maps(self, name: str = REAL_VALIDATION_MAPS) -> Path | None:
        """The file ``name`` in the real-data folder, or None when there is no such file."""
        folder = self.real_data_dir()
        path = folder / name if folder is not None else None
        return path if path is not None and path.is_file() else None


def settings() -> Settings:
    """The current environment's settings (read now; cheap, no caching)."""
    return Settings()
