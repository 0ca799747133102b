"""Measuring: a model's outputs and fidelity against the reference, its speed, the eval suites and
the gates that judge them."""
