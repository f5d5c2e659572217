"""Prefect flows that orchestrate the DVC pipeline; no stage logic lives here.

- `flows.compress`: the pipeline flow (one Prefect task per DVC stage, `dvc repro --single-item`).
- `flows.sweep`: a grid of compression recipes as DVC experiments, with a Pareto front.
- `flows.project`: what both need from a DVC project (its DAG, running DVC commands).
"""
