"""Command-line entry: a user's mistake (bad key, missing file, existing run) prints one clear line,
not a traceback; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from reward_models.geneval_server import RewardServerError
from rsm_core.config import ConfigError
from rsm_core.records import AssetError, IncompleteRunError, RunExistsError

# a reward server that is down or answers garbage is the user's setup to fix, named in the message
USER_ERRORS = (
    ConfigError,
    RunExistsError,
    IncompleteRunError,
    AssetError,
    FileNotFoundError,
    RewardServerError,
)


def run(main: Callable[[list[str] | None], None]) -> None:
    try:
        main(None)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
