"""The check engine: numerics, settings and types, the modes and the auto strategy, the joint
screen, the assessment and the report; the numpy (`check`) and PyTorch (`check_module`)
backends and the float64 guard.

Imports: gradwatch.common only.
"""
