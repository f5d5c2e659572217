"""The `shrinkflow` console (typer): benchmarks (`app.py`), human review of registered candidates
(`review.py`) and the input-size benchmark (`bench_sizes.py`)."""
