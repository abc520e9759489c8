"""Evaluation: fidelity to the FP model, cost accounting, sample grids."""
