"""Backtest reports: accuracy metrics, stateful versus window divergence, plots and HTML."""

from streamer.backtest.divergence import Divergence, divergence
from streamer.backtest.report import ReportPaths, analyze, format_summary, write_report

__all__ = ["Divergence", "ReportPaths", "analyze", "divergence", "format_summary", "write_report"]
