"""convert: turn image collections into training-ready HDF5/LMDB shards with Dask.

from convert import run, open_dataset, load_config
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["run", "open_dataset", "load_config", "Config"]

if TYPE_CHECKING:
    from .config import Config, load_config
    from .dataset import open_dataset
    from .orchestrate import run


def __getattr__(name: str) -> Any:
    # Lazy: `import convert` stays cheap (no dask import) for readers in DataLoader workers.
    if name == "run":
        from .orchestrate import run

        return run
    if name == "open_dataset":
        from .dataset import open_dataset

        return open_dataset
    if name in ("load_config", "Config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(name)
