"""gradwatch dashboard definitions: Vega-Lite chart specs, Prometheus rules and Grafana JSON.

Data files only, read with importlib.resources (installed as gradwatch.dashboards).
"""
