"""The MLflow record of a run: its layout (keys, tags, artifact paths), the writer and its durable
spool, and the reader used by the monitor and the dashboards.

Imports: gradwatch.common, gradwatch.engine (the report type).
"""
