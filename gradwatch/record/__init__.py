"""The MLflow record of a run: its layout, the writer and its spool, and the reader.

The layout (keys, tags, artifact paths) is one module that the writer and every reader
import; the reader is used by the monitor and the dashboards; the recorder (`MlflowRecorder`,
`NullRecorder`, the `Recorder` protocol, `RecordSettings`) is what a `GradWatch` records through.

Imports: gradwatch.common, gradwatch.engine (the report type).
"""
