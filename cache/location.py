"""Where the raw dataset and the cache are when a command line does not say.

The field's conventions, so that these run as written in one working directory:

    dataprep build --root /data/cityscapes
    dataprep stats
    train --loader dali --res 640

- dataset root: the flag (`--root`), else `$CITYSCAPES_DATASET` (cityscapesscripts' own
  variable: its preparation and evaluation scripts read it too), else an error.
- cache: the flag (`--cache`, or `--out` of `dataprep build`), else `$CITYSCAPES_CACHE`,
  else `./cityscapes.zarr` in the working directory. A fixed name in the working directory
  is the one default that `dataprep build` and a later `train` agree on without being told
  the root, and it keeps a cache of ~3x the dataset's size where the user can see it (not
  hidden in ~/.cache).

API (every command-line layer may use it; nothing heavy is imported):

    resolve_root(flag)  -> Location   flag, else $CITYSCAPES_DATASET, else UserError
    resolve_cache(flag, must_exist=False) -> Location
                                      flag, else $CITYSCAPES_CACHE, else ./cityscapes.zarr;
                                      must_exist: UserError naming the place and its source
    default_root(), default_cache()   -> Location from the environment only (root: path None
                                      when the variable is unset)
    Location.path, Location.source, Location.is_default, Location.describe("cache")
        -> "cache: /abs/cityscapes.zarr (default ./cityscapes.zarr; --cache or $CITYSCAPES_CACHE to change)"
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from cache.errors import UserError

DATASET_VAR = "CITYSCAPES_DATASET"
CACHE_VAR = "CITYSCAPES_CACHE"
DEFAULT_CACHE = Path("cityscapes.zarr")
DEFAULT_SOURCE = "default"


class Location(NamedTuple):
    """A path and where it came from: a flag ("--cache"), a variable ("$CITYSCAPES_CACHE"),
    or "default". Unpacks as (path, source)."""

    path: Path | None
    source: str

    @property
    def is_default(self) -> bool:
        return self.source == DEFAULT_SOURCE

    def describe(self, what: str) -> str:
        """One line for the user, e.g. 'cache: /abs/cityscapes.zarr (from $CITYSCAPES_CACHE)'."""
        if self.path is None:
            return f"{what}: not set ({self.source})"
        where = self.path.absolute()
        if self.is_default:
            return f"{what}: {where} (default ./{DEFAULT_CACHE}; --cache or ${CACHE_VAR} to change)"
        return f"{what}: {where} (from {self.source})"


def _from_environment(variable: str) -> Path | None:
    value = os.environ.get(variable, "").strip()
    return Path(os.path.expanduser(value)) if value else None


def default_root() -> Location:
    """The dataset root from $CITYSCAPES_DATASET; path None (source says so) when it is unset."""
    path = _from_environment(DATASET_VAR)
    return Location(path, f"${DATASET_VAR}" if path else f"${DATASET_VAR} is not set")


def default_cache() -> Location:
    """The cache from $CITYSCAPES_CACHE, else ./cityscapes.zarr in the working directory."""
    path = _from_environment(CACHE_VAR)
    return Location(path, f"${CACHE_VAR}") if path else Location(DEFAULT_CACHE, DEFAULT_SOURCE)


def resolve_root(flag: str | os.PathLike | None, flag_name: str = "--root") -> Location:
    """The dataset root: the flag if given, else $CITYSCAPES_DATASET, else a one-line UserError."""
    if flag is not None:
        return Location(Path(flag), flag_name)
    found = default_root()
    if found.path is None:
        raise UserError(f"no dataset root: pass {flag_name} DIR or set ${DATASET_VAR} to the folder "
                        "that holds leftImg8bit/ and gtFine/")
    return found


def resolve_cache(flag: str | os.PathLike | None, flag_name: str = "--cache",
                  must_exist: bool = False) -> Location:
    """The cache: the flag if given, else $CITYSCAPES_CACHE, else ./cityscapes.zarr.

    must_exist: a missing folder is a UserError that says where we looked and why there, so
    that a command run in another working directory than the build says what to do.
    """
    found = Location(Path(flag), flag_name) if flag is not None else default_cache()
    if must_exist and not found.path.is_dir():
        if found.is_default:
            why = (f"the default, ./{DEFAULT_CACHE} in the working directory; run `dataprep build` "
                   f"here first, or pass {flag_name} DIR or set ${CACHE_VAR}")
        else:
            why = f"from {found.source}; make one with `dataprep build`"
        raise UserError(f"{found.path.absolute()}: no cache there ({why})")
    return found
