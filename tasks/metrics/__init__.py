"""What the stages measure: detection metrics (`detection.py`, pycocotools), fair in-process
latency of several runtimes (`timing.py`), the latency of a PyTorch model on an engine target
(`torch_latency.py`), and the Pareto front of recipes (`pareto.py`)."""
