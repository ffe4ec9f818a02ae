"""The federated algorithm without Lightning: blocks, schedules, round planning, virtual clients, the federation
(one global model plus each client's pending deltas), fp32 master weights, seeded random streams. Imports torch
only.
"""
