"""Producers turn sources (local folders, buckets, URL lists) into image references and jobs."""
