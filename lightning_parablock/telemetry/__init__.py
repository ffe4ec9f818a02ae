"""What a run measured and what it implies: the per-round timeline, the modelled federated wall-clock, the report
and its plots.
"""
