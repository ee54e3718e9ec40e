"""Thin adapters over the core and storage: the Ray Data batch job, the Ray Serve application and the CLI."""
