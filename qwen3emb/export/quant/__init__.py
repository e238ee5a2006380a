"""Precision variants of an fp32 graph (fp16, int8, int4): recipes, calibration, and the
builders that rewrite one weight tensor at a time."""
