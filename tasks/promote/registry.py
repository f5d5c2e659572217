"""The MLflow model registry side of `promote`: registering a candidate version (one per
candidate, found again by its identity `candidate_md5`), updating its tags and card, undoing a
failed registration, and the two MLflow error codes the registry's callers tell apart. Moving
the aliases is the alias ledger's (tasks/promote/ledger.py).
"""

from __future__ import annotations

import hashlib
import json

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

TAG_LIMIT = 5000  # MLflow's limit on a model-version tag value we keep to


def already_exists(e: Exception) -> bool:
    return isinstance(e, MlflowException) and e.error_code in (
        "RESOURCE_ALREADY_EXISTS",
        "ALREADY_EXISTS",
    )


def not_found(e: Exception) -> bool:
    return isinstance(e, MlflowException) and e.error_code == "RESOURCE_DOES_NOT_EXIST"


def register_version(
    client: MlflowClient,
    name: str,
    *,
    source: str,
    run_id: str,
    tags: dict[str, str],
    description: str,
) -> tuple[str, bool]:
    """Create a version of `name` (and `name` itself on first use) with its tags and card.

    Returns (version, whether the registered model was created by this call).
    """
    created = False
    try:
        client.create_registered_model(
            name,
            tags={"shrinkflow.role": "detector"},
            description="Shrinkflow detector: ONNX + built engines as an MLflow pyfunc. "
            "Aliases: champion (deploy this), previous (rollback), challenger (latest candidate).",
        )
        created = True
    except MlflowException as e:
        if not already_exists(e):
            raise
    mv = client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags={k: v[:TAG_LIMIT] for k, v in tags.items()},
        description=description,
    )
    return str(mv.version), created


def unregister(client: MlflowClient, name: str, version: str, model_created: bool) -> None:
    """Undo `register_version` (a failed promotion leaves nothing half-registered)."""
    client.delete_model_version(name, version)
    if model_created and not client.search_model_versions(f"name = '{name}'", max_results=1):
        client.delete_registered_model(name)


def candidate_md5(onnx_md5: str, spec: dict) -> str:
    """What makes two promotions the same candidate: the ONNX file and what serves it (target,
    input size, categories, engine settings: the pyfunc's `detector.json`)."""
    return hashlib.md5(f"{onnx_md5}:{json.dumps(spec, sort_keys=True)}".encode()).hexdigest()


def find_candidate(client: MlflowClient, name: str, identity: str) -> str | None:
    """The version of `name` that already holds this candidate (tag `candidate_md5`), or None:
    a candidate is registered once, however often `promote` runs on it."""
    try:
        found = client.search_model_versions(
            f"name = '{name}' and tags.candidate_md5 = '{identity}'"
        )
    except MlflowException as e:
        if not_found(e):
            return None
        raise
    return str(min(int(mv.version) for mv in found)) if found else None


def update_version(
    client: MlflowClient, name: str, version: str, *, tags: dict[str, str], description: str
) -> None:
    """Give an existing version the tags and card of its latest judgement (gate tags of gates
    no longer configured are removed; review tags are kept)."""
    old = client.get_model_version(name, version).tags
    for key in old:
        if key.startswith("gate.") and key not in tags:
            client.delete_model_version_tag(name, version, key)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value[:TAG_LIMIT])
    client.update_model_version(name, version, description=description)
