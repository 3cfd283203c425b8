"""TRANSITIONAL: re-exports the sub-command from its stage module until it moves here."""

from __future__ import annotations

from jax_brainage.explain.command import add_parser, run  # noqa: F401
