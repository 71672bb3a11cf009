"""Autoscaling decisions: pure functions over plain inputs.

``decide`` is the HPA algorithm (ratio to target, tolerance, stabilisation windows, maximum
step, bounds) plus GPU capacity and scale to zero; ``capacity`` counts the replicas the
reachable GPUs hold; ``plan`` turns a round's decision into what to write. The PromQL of each
metric is in ``promql.py``; ``observe`` reads, ``act`` writes, ``reconcile.autoscale`` runs a
round.
"""

AUTOSCALER_MANAGER = "modeldeploy-autoscaler"  # field manager of spec.replicas it writes
