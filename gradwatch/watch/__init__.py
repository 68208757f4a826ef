"""`GradWatch`, the training-time watch, and what it needs while training runs.

The callback, its check plan, its schedule, the adaptive budget, probe capture and the
distributed handshake. It records through the `Recorder` it is given (`gradwatch.record`).

Imports: gradwatch.common, engine, record, alerts, dashboard (the run report it requests).
"""
