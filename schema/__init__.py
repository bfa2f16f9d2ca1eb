"""Contracts shared by producers and workers: settings, tables, URIs, the error taxonomy."""
