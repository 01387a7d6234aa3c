"""The benchmark suites behind ``scripts/benchmark.py``, one module per suite.

``common`` holds what several suites share (child processes, launcher runs, tables,
the machine record); ``transport``, ``modes``, ``stragglers``, ``train`` and ``scale``
each define ``add_arguments(parser)``, ``resolve(args, parser)`` (defaults, --tiny)
and ``run(args) -> (rows, markdown)``. ``ddp_baseline`` and ``rpc_baseline`` are
self-contained torch programs the ``train`` suite runs beside the parameter server.
"""
