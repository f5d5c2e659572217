"""Dataset formats `ingest` reads: builtin digits, COCO, YOLO (Ultralytics layout), Pascal VOC.

Each reader turns a folder into a `Source` (COCO-style images and annotations per split, or one
pool under `all` that `split.py` splits); `ingest` writes it as the internal COCO manifest. A file
that cannot be used raises DataError naming the file and the field; problems inside usable labels
(a box leaving its image, a duplicate) are left for label QA to report.
"""

from tasks.datasets.common import POOL, Source
from tasks.datasets.readers import READERS, read

__all__ = ["POOL", "READERS", "Source", "read"]
