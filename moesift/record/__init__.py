"""Produce traces: the transformers tracer, its on-device recorder, and importers of serving-engine dumps."""
