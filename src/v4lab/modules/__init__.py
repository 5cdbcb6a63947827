"""Architectural pieces: pure PyTorch modules, one file per piece.

Nothing here imports Hydra, Lightning or W&B, or touches the file system.
"""
