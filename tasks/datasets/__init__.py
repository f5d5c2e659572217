"""Datasets: the formats `ingest` reads (`readers.py`: builtin digits, COCO, YOLO in the
Ultralytics layout, Pascal VOC; `split.py` for a dataset that comes as one pool), the COCO schema
and the letterboxed dataset every PyTorch stage reads (`coco.py`), the project's own generated
sets (`digits.py`, `shapes.py`), known label noise (`label_noise.py`) and the perceptual hash that
groups near-duplicate images (`imagehash.py`).

Each reader turns a folder into a `Source` (COCO-style images and annotations per split, or one
pool under `all` that `split.py` splits); `ingest` writes it as the internal COCO manifest. A file
that cannot be used raises DataError naming the file and the field; problems inside usable labels
(a box leaving its image, a duplicate) are left for label QA to report.
"""
