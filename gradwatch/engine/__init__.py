"""The check engine: the maths and the verdicts of one gradient check.

Numerics, settings and types, the modes and the auto strategy, the joint screen, the
assessment and the report; the numpy (`check`) and PyTorch (`check_module`) backends and the
float64 guard. (Not `gradwatch/check/`: that package would shadow the public function
`gradwatch.check`.)

Imports: gradwatch.common only.
"""
