"""optimize: take a trained checkpoint to a smaller, faster release artifact, gated on quality.

The package is flat on purpose: `cli` builds a recipe, `pipeline` runs it, `stages/` holds one file
per stage kind, `evaluate` measures, `gate` judges, `artifact` writes. See README.md for a tour.
"""

__version__ = "0.1.0"
