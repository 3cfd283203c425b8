"""Relevance maps, region tables, figures and `brainage explain`."""

from __future__ import annotations
