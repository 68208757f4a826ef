"""The monitoring service that reads the gradwatch record from MLflow and notifies.

Configuration, rules, durable state, Prometheus metrics, the poll loop and its command line.

Imports: gradwatch.common, gradwatch.engine, gradwatch.record, gradwatch.alerts.
"""
