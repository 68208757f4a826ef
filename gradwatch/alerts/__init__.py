"""Alerts: the pending/firing/resolved state machine, the notifiers and the dispatcher, shared
by the training-time watch and the monitor.

Imports: gradwatch.common only.
"""
