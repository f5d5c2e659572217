"""The stage harness every entry point shares: the stage context (`stage.py`), typed params
(`config/`), the error hierarchy, atomic file writes, MLflow tracking, the project on disk, and
the PyTorch stages' `skipped` report for an imported ONNX."""
