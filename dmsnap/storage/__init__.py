"""Pools, volumes, snapshot backends, the catalog, and loop devices."""
