"""`GradWatch`, the training-time watch: the callback, its schedule, the adaptive budget, probe
capture and the distributed handshake.

Imports: gradwatch.common, engine, record, alerts, dashboard (the run report it requests).
"""
