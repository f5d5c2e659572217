"""The README's measured figures, rendered from the files the benchmarks and stages wrote.

Each table lives in README.md between `<!-- measured:NAME -->` and `<!-- /measured:NAME -->` and
is made here from `artifacts/` only, so a figure in the README is always one a command wrote:

    shrinkflow readme            # re-render every table in place
    shrinkflow readme --check    # exit 1 when the README and artifacts/ disagree (a test runs it)

A table whose source file is missing renders as one line saying which file and which command
makes it. Numbers are formatted here, once: mAP with 4 decimals, points with 2, ms with 2 (3
below 1 ms), sizes in MB with 2, MACs in millions.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path

TARGETS = ("onnxruntime", "openvino", "litert", "tensorrt")
TableFn = Callable[[Path], str]  # a table's text from the project root
MARK = re.compile(r"(<!-- measured:(\w[\w-]*) -->\n)(.*?)(<!-- /measured:\2 -->)", re.S)


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}" if v < 1 else f"{v:.2f}"


def _map(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}×"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _load(root: Path, rel: str) -> dict | None:
    path = root / rel
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _missing(rel: str, command: str) -> str:
    return f"*Not measured yet: `{rel}` is written by `{command}`.*\n"


def from_file(rel: str, command: str) -> Callable[[Callable[[dict, Path], str]], TableFn]:
    """A table made from one JSON file `rel` under the project root: the decorated function
    gets the loaded file and the root; a missing file renders as the line naming it and the
    `command` that writes it."""

    def wrap(make: Callable[[dict, Path], str]) -> TableFn:
        @functools.wraps(make)
        def table(root: Path) -> str:
            m = _load(root, rel)
            return _missing(rel, command) if m is None else make(m, root)

        return table

    return wrap


def pipeline(root: Path) -> str:
    """The deployed engine per target against FP32 (evaluate@<target>'s metrics.json)."""
    rows, base = [], None
    for target in TARGETS:
        m = _load(root, f"artifacts/evaluate/{target}/metrics.json")
        if m is None:
            continue
        if m.get("status") != "ok":
            rows.append([f"deployed, {target}", m.get("status", "?"), "", "", "", "", ""])
            continue
        base = base or m.get("baseline")
        ref = m.get("fp32_same_runtime") or {}
        rows.append(
            [
                f"deployed, {target}",
                _map(m["map50"]),
                f"{100 * m['delta_map50']:+.2f}",
                _ms(m["latency_ms_p50"]),
                _x(m.get("speedup_vs_fp32_same_runtime")),
                _x(m.get("speedup_vs_eager")),
                f"{m['size_mb']:.2f} (FP32 {ref.get('size_mb', 0):.2f})",
            ]
        )
    if not rows:
        return _missing("artifacts/evaluate/<target>/metrics.json", "dvc repro")
    head = []
    if base:
        head = [["FP32 PyTorch eager (trained)", _map(base.get("map50")), "", "", "", "", ""]]
    return _table(
        [
            "test split",
            "mAP@0.5",
            "Δ vs FP32 (points)",
            "batch-1 p50 (ms)",
            "vs FP32, same runtime",
            "vs FP32 eager",
            "size (MB)",
        ],
        head + rows,
    )


@from_file("artifacts/variants/metrics.json", "dvc repro variants")
def variants(m: dict, root: Path) -> str:
    """Every step of the recipe and the peers (the variants stage's metrics.json)."""
    rows = []
    for name, r in m.items():
        if not isinstance(r, dict):
            continue
        if "map50" not in r:
            rows.append([name, r.get("runtime", ""), r.get("status", "skipped"), "", "", "", ""])
            continue
        rows.append(
            [
                name,
                r.get("runtime", ""),
                _map(r["map50"]),
                _map(r.get("map50_95")),
                _ms(r.get("latency_ms_p50")),
                f"{r['size_mb']:.2f}" if r.get("size_mb") is not None else "",
                f"{r['macs'] / 1e6:.1f}" if r.get("macs") else "",
            ]
        )
    return _table(
        ["variant", "runtime", "mAP@0.5", "mAP@0.5:0.95", "p50 (ms)", "size (MB)", "MACs (M)"],
        rows,
    ) + _versus(m)


def _versus(rows: dict) -> str:
    """The variants' `vs_peer` figures (ours against each peer, paired over test images) as a
    second table, or nothing when the run has none."""
    found = [
        (name, peer, v)
        for name, r in rows.items()
        if isinstance(r, dict)
        for peer, v in (r.get("vs_peer") or {}).items()
    ]
    if not found:
        return ""
    conf = found[0][2]["confidence"]
    body = [
        [
            name,
            peer,
            f"{100 * v['map50_diff']:+.2f}",
            f"[{100 * v['ci_low']:+.2f}, {100 * v['ci_high']:+.2f}]",
            v["verdict"],
            _x(v["speedup"]),
        ]
        for name, peer, v in found
    ]
    head = ["ours", "peer", "Δ mAP@0.5 (points)", f"{conf:.0%} interval", "verdict", "faster"]
    return (
        f"\nOurs against each peer on the same test images (mAP@0.5 difference, its paired "
        f"bootstrap interval over test images):\n\n{_table(head, body)}"
    )


@from_file("artifacts/bench/engines-b1.json", "shrinkflow bench")
def engines(m: dict, root: Path) -> str:
    """`shrinkflow bench`: every built engine beside FP32, one process, shuffled rounds."""
    rows = [
        [
            name,
            _ms(r["latency_ms_p50"]),
            _ms(r.get("latency_ms_p95")),
            f"{r['throughput_ips']:.0f}",
            _x(r.get("speedup_vs_eager")),
        ]
        for name, r in m["runtimes"].items()
    ]
    note = (
        f"Batch {m['batch']}, {m['threads']} threads, {m['runs']} calls per runtime in "
        f"{m['rounds']} shuffled rounds.\n\n"
    )
    return note + _table(["runtime", "p50 (ms)", "p95 (ms)", "img/s", "vs FP32 eager"], rows)


@from_file("artifacts/bench/sizes-b1.json", "shrinkflow bench-sizes")
def sizes(m: dict, root: Path) -> str:
    """`shrinkflow bench-sizes`: the compressed model's speedups at several input sizes."""
    rows = []
    for size, s in m["sizes"].items():
        r = s["ratios"]
        rows.append(
            [
                f"{size} px",
                _x(r.get("onnxruntime_compressed_vs_eager")),
                _x(r.get("onnxruntime_compressed_vs_fp32_same_runtime")),
                _x(r.get("openvino_compressed_vs_eager")),
                _x(r.get("openvino_compressed_vs_fp32_same_runtime")),
                _x(r.get("openvino_compressed_vs_openvino_bf16")),
            ]
        )
    return _table(
        [
            "input",
            "ORT INT8 vs eager",
            "ORT INT8 vs ORT FP32",
            "OV INT8 vs eager",
            "OV INT8 vs OV FP32",
            "OV INT8 vs OV bf16",
        ],
        rows,
    )


@from_file("artifacts/bench/pipeline-default.json", "shrinkflow bench-pipeline --profile default")
def pipeline_time(m: dict, root: Path) -> str:
    """`shrinkflow bench-pipeline`: wall time of a cold and a no-op `dvc repro`, per stage."""
    out = (
        f"Cold `dvc repro`: **{m['dvc_repro_cold_s']:.0f} s**; no-op: "
        f"{m['dvc_repro_noop_s']:.1f} s ({m['machine'].get('cpus', '?')} CPUs).\n"
    )
    then = (m.get("kpis") or {}).get("evaluate/onnxruntime", {}).get("map50")
    now = (_load(root, "artifacts/evaluate/onnxruntime/metrics.json") or {}).get("map50")
    if then is not None and now is not None and abs(then - now) > 5e-5:
        out += (
            f"\n*Stale: that run deployed a model of mAP@0.5 {then:.4f}, the pipeline's current "
            f"one scores {now:.4f}; re-run the command above.*\n"
        )
    per_stage = m.get("stage_s") or {}
    if per_stage:
        rows = [[name, f"{s:.0f}"] for name, s in per_stage.items()]
        out += "\n" + _table(["stage", "seconds"], rows)
    return out


YOLO_ROWS = (
    "trained", "distilled", "deployed", "deployed_openvino", "litert", "nncf_accuracy_control",
    "ultralytics_openvino_int8",
)  # fmt: skip


@from_file("artifacts/bench/pipeline-yolo.json", "shrinkflow bench-pipeline --profile yolo")
def pipeline_yolo(m: dict, root: Path) -> str:
    """`shrinkflow bench-pipeline --profile yolo`: the variants of a YOLOv8n run on the default
    data beside Ultralytics' own OpenVINO INT8 export of the same unpruned model (one process)."""
    rows_in = (m.get("kpis") or {}).get("variants") or {}
    ref = rows_in.get("ultralytics_openvino_int8") or {}
    fp32 = (rows_in.get("trained") or {}).get("map50")
    rows = []
    for name in YOLO_ROWS:
        r = rows_in.get(name)
        if not isinstance(r, dict) or "map50" not in r:
            continue
        delta = "" if fp32 is None else f"{100 * (r['map50'] - fp32):+.2f}"
        ms, ref_ms = r.get("latency_ms_p50"), ref.get("latency_ms_p50")
        ratio = ref_ms / ms if ms and ref_ms else None
        rows.append(
            [
                name,
                r.get("runtime", ""),
                _map(r["map50"]),
                delta,
                _ms(r.get("latency_ms_p50")),
                _x(ratio),
                f"{r['macs'] / 1e6:.1f}" if r.get("macs") else "",
            ]
        )
    out = f"Cold `dvc repro` of the profile: {m['dvc_repro_cold_s']:.0f} s.\n\n"
    return (
        out
        + _table(
            [
                "variant",
                "runtime",
                "test mAP@0.5",
                "Δ vs trained FP32 (points)",
                "p50 (ms)",
                "speedup vs Ultralytics INT8",
                "MACs (M)",
            ],
            rows,
        )
        + _versus(rows_in)
    )


LABEL_QA = ("artifacts/bench/label-qa-<dataset>.json", "shrinkflow bench-label-qa")


def _label_qa_runs(root: Path) -> dict[str, dict]:
    """{run (the file's `<dataset>`): its content} of every label-QA benchmark file, by name."""
    return {
        path.stem.removeprefix("label-qa-"): json.loads(path.read_text(encoding="utf-8"))
        for path in sorted((root / "artifacts/bench").glob("label-qa-*.json"))
    }


def label_qa(root: Path) -> str:
    """`shrinkflow bench-label-qa`: recall and precision per kind of injected label error."""
    rows = []
    for run, m in _label_qa_runs(root).items():
        det = m.get("detection") or {}
        for kind, k in (det.get("kinds") or {}).items():
            precision = ", ".join(
                f"{rule} {p:.3f}" for rule, p in k["precision_of_rule"].items() if p is not None
            )
            rows.append([run, kind, str(k["injected"]), f"{k['recall']:.3f}", precision])
    if not rows:
        return _missing(*LABEL_QA)
    return _table(["run", "injected kind", "injected", "recall", "precision of the rule"], rows)


@from_file("artifacts/bench/input-cache.json", "shrinkflow bench-input-cache")
def input_cache(m: dict, root: Path) -> str:
    """`shrinkflow bench-input-cache`: memory and decode time of a large set through the input
    cache (one fresh process: decode, then one pass over every batch)."""
    w, h = m["image_wh"]
    row = [
        f"{m['images']:,} × {w}×{h} JPEG",
        f"{m['input_size']} px",
        f"{m['decode_s']:.0f}",
        f"{m['cache_file_mb'] / 1024:.2f}",
        f"{m['peak_rss_mb'] / 1024:.2f}",
        f"{m['anon_mb']:.0f}",
        f"{m['native_uint8_mb'] / 1024:.2f}",
    ]
    header = [
        "images",
        "input",
        "decode (s)",
        "cache file (GiB)",
        "peak RSS (GiB)",
        "anonymous memory after a pass (MiB)",
        "the set decoded in RAM (GiB)",
    ]
    return _table(header, [row])


VARIANTS = {
    "clean": "clean labels",
    "noisy": "noisy (the injected errors)",
    "cleaned": "cleaned, default policy",
    "cleaned_report_only": "cleaned, model rules only reporting",
    "clean_cleaned": "clean labels, cleaned with the default policy",
}


def label_qa_training(root: Path) -> str:
    """`shrinkflow bench-label-qa`: the same recipe trained on each variant of the train split,
    tested on the untouched test split."""
    rows = []
    for run, m in _label_qa_runs(root).items():
        tests = (m.get("training") or {}).get("test")
        for key, label in VARIANTS.items():
            if tests and key in tests:
                t = tests[key]
                rows.append([run, label, _map(t["map50"]), _map(t.get("map50_95"))])
    if not rows:
        return _missing(*LABEL_QA)
    return _table(["run", "train labels", "test mAP@0.5", "mAP@0.5:0.95"], rows)


TABLES: dict[str, TableFn] = {
    "pipeline": pipeline,
    "variants": variants,
    "engines": engines,
    "sizes": sizes,
    "pipeline-time": pipeline_time,
    "pipeline-yolo": pipeline_yolo,
    "label-qa": label_qa,
    "label-qa-training": label_qa_training,
    "input-cache": input_cache,
}


def render(readme: str, root: Path) -> str:
    """`readme` with every `<!-- measured:NAME -->` block re-made from `root`'s artifacts.

    Raises:
        KeyError: a block names a table this module does not make.
    """

    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise KeyError(f"README.md: <!-- measured:{name} -->: no such table ({sorted(TABLES)})")
        return m.group(1) + TABLES[name](root) + m.group(4)

    return MARK.sub(fill, readme)
