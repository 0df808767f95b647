"""Targets: what "latency" means (Workload), deployment target profiles, latency tables and the predictor."""

from llmshrink.targets.profile import TargetProfile, builtin_names, load_target
from llmshrink.targets.workload import Workload, parse_workload

__all__ = ["TargetProfile", "Workload", "builtin_names", "load_target", "parse_workload"]
