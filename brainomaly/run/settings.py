"""The settings a command runs with: main.py's flags, completed by what the run records (a checkpoint's architecture,
config.json's settings, the known-healthy split, the fast path). Read-only once built, so that every part reads the
same values and no function changes what its caller holds: a step that completes them makes a new object
(replace_config)."""
import argparse


class Settings(argparse.Namespace):
    """argparse's Namespace (attribute access, vars(), pickling), read-only."""

    def __init__(self, **values):
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"the settings are read-only (setting {name!r}); make a new object with "
                             f"replace_config(settings, {name}=...)")

    def __delattr__(self, name):
        raise AttributeError(f"the settings are read-only (deleting {name!r})")


def replace_config(config, **changes):
    """New settings: config's values with some changed; the caller's config stays as it was."""
    return Settings(**{**vars(config), **changes})
