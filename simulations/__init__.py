"""Simulation: in-process Flower grids (one client at a time, or many at once on the batched engine), the
experiment drivers built on the shared resumable sweep helper, and the run configs (``*.toml``)."""
