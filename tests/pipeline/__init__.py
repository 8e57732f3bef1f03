"""Tests of the pipeline stage (assembly, routing)."""
