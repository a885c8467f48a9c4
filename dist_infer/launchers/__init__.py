"""Launchers: a cluster file (clusters/*.yaml) -> mpirun, an sbatch job, or a Ray job.

Model and worker code never import this package; it only starts processes
that run `dist-infer run|serve` as ranks.
"""

from dist_infer.launchers.cluster import ClusterConfig, ClusterConfigError, load_cluster
from dist_infer.launchers.commands import LaunchPlan, plan_launch
from dist_infer.launchers.launch import launch

__all__ = ["ClusterConfig", "ClusterConfigError", "LaunchPlan", "launch", "load_cluster", "plan_launch"]
