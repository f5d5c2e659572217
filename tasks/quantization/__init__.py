"""Quantization primitives: ONNX Runtime's QDQ calibration and INT8 (`qdq.py`), quantization-aware
fine-tuning (`qat.py`), NNCF's INT8 on OpenVINO (`nncf_peers.py`), and the numeric precision of a
graph (`precision.py`)."""
