"""The ``hbmeta`` command line (``hbmeta --help``); :mod:`hbmeta.cli.rl` is its meta-RL branch."""

from hbmeta.cli.main import build_parser, main, train_settings

__all__ = ["main", "build_parser", "train_settings"]
