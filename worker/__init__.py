"""Workers: the torch side of the cluster (``python -m worker``)."""
