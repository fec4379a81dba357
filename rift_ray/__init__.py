"""rift-ray: RiFT (Robust Critical Fine-Tuning) end to end as a distributed sweep on Ray."""

__version__ = "0.1.0"
