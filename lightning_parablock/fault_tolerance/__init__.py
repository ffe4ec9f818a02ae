"""Faults across ranks and preemption: a failing rank named on every rank, SIGTERM agreed at turn starts, SLURM
requeue at round ends.
"""
