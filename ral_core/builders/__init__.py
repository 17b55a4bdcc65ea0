"""Offline builders of real-architecture models for tests, benchmarks and `make default-model`: `tiny` (small
random configs of every supported family) and `twins` (published configs with random weights). Never imported by
the engine: model loading lives in `ral_core.models`."""
