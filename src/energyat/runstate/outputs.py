"""Where the pipeline keeps the stage outputs that other stages read: one place for each shared path."""
from __future__ import annotations

CLASS_ENERGY = "data/class_energy.json"  # the class-energy stage's Ē_y of both models


def model_path(variant: str, run: str) -> str:
    return f"models/{variant}/{run}/best.pt"


def samples_path(sampler: str, variant: str) -> str:
    return f"data/samples/{sampler}/{variant}.pt"
