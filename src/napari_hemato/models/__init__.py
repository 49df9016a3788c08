"""Model specs and predictors (onnxruntime backend, fakes for tests)."""
