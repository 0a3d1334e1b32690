"""Datasets: procedural shapes scenes and adapters for COCO / Karpathy splits."""
