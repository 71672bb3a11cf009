"""Leader election on a coordination.k8s.io/v1 Lease: the pure decisions (``decide``) and the
loop that carries them out against the API server (``elector``)."""
