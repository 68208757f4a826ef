"""Alerts shared by the training-time watch and the monitor.

The pending/firing/resolved state machine, the notifications, their channels, the
dispatcher and `AlertSettings`; below both the watch and the monitor, which import it.

Imports: gradwatch.common only.
"""
