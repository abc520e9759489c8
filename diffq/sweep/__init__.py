"""Sweeps: per-job summary rows, Pareto fronts, plots, the comparison grid and the report."""
from diffq.sweep.report import SummaryCallback, main, write_report
from diffq.sweep.rows import job_row

__all__ = ["SummaryCallback", "job_row", "main", "write_report"]
