"""The monitoring service: configuration, rules, durable state, Prometheus metrics, the poll loop
and its command line.

Imports: gradwatch.common, gradwatch.engine, gradwatch.record, gradwatch.alerts.
"""
