"""Build the default matching model shipped with the package (`identity/data/default_model.json`).

Why ship one: a new node has too few patients to estimate m/u probabilities by
itself; the default is fitted, unsupervised, on the synthetic Vietnamese
population (no real patient data), and a facility can refit on its own data with
`lienthong mpi train`. Regenerate with `python -m lienthong.identity.default_model`.
"""

from __future__ import annotations

from pathlib import Path

from lienthong.identity.matching import fit
from lienthong.identity.synth import generate

TRAINING_SIZE = 20_000
SEED = 2025
OUT = Path(__file__).with_name("data") / "default_model.json"


def build(size: int = TRAINING_SIZE, seed: int = SEED) -> str:
    model = fit([r.record for r in generate(size, seed)])
    model.training = {**model.training, "source": f"synthetic population, {size} records, seed {seed}"}
    return model.to_json()


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(build(), encoding="utf-8")
    print(f"wrote {OUT}")
