"""The routing report: ``build_report`` writes an HTML page with PNG plots from a routing trace and/or a run's
``metrics.jsonl``; ``summary_text`` gives the same findings in a few terminal lines; ``analyse`` computes the
statistics once for both.
"""
from .analysis import METRICS_FILE, TRACE_FILE, Analysis, TraceStats, analyse, report_inputs, resolve_groups
from .build import build_report
from .metrics import MetricsHistory, read_metrics
from .summary import summary_text

__all__ = ["Analysis", "TraceStats", "MetricsHistory", "analyse", "build_report", "read_metrics", "report_inputs",
           "resolve_groups", "summary_text", "TRACE_FILE", "METRICS_FILE"]
