"""Targets: what "latency" means (Workload) and, later, profiles and latency tables."""

from llmshrink.targets.workload import Workload, parse_workload

__all__ = ["Workload", "parse_workload"]
