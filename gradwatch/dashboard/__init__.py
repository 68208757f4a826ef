"""Pages for the MLflow UI: the run report, the experiment dashboard, their charts and PNG.

Imports: gradwatch.common, gradwatch.engine, gradwatch.record.
"""
