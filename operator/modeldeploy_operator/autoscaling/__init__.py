"""Autoscaling decisions: pure functions over plain inputs.

``decide`` is the HPA algorithm (ratio to target, tolerance, stabilisation windows, maximum
step, bounds) plus GPU capacity and scale to zero; ``capacity`` counts the replicas the
reachable GPUs hold; the PromQL of each metric is in ``promql.py``. ``autoscaler.py`` does the I/O.
"""

AUTOSCALER_MANAGER = "modeldeploy-autoscaler"  # field manager of spec.replicas it writes
