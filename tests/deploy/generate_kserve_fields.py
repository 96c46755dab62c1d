"""Write kserve_v1beta1_fields.json: the InferenceService's fields as the KServe SDK's generated models know them.

KServe's CRD schema is not published anywhere reachable offline, but the SDK on PyPI carries one generated model
class per API type (``kserve/models/v1beta1_*.py``), each with ``openapi_types`` (attribute -> type) and
``attribute_map`` (attribute -> JSON key). This reads those two literals from the source (``ast``, so none of the
SDK's many dependencies is needed), keeps the types reachable from V1beta1InferenceService, and writes them keyed
by JSON name. Kubernetes types they refer to (V1Container, V1ObjectMeta, ...) are not KServe's and are left as
names: the validator checks them against kubernetes-validate's schemas.

Run again for a newer KServe (the SDK is not a test dependency: it would pull in FastAPI, pandas and more)::

    pip install --no-deps --target /tmp/kserve-sdk kserve==0.21.0
    python -m tests.deploy.generate_kserve_fields /tmp/kserve-sdk     # from the repository root
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

from tests.deploy.kserve_fields import FIELDS_FILE, type_names

ROOT_TYPE = "V1beta1InferenceService"


def class_literals(models_dir: Path) -> dict[str, dict[str, dict[str, str]]]:
    """Every model class with a non-empty ``openapi_types``: {class: {"openapi_types": ..., "attribute_map": ...}}."""
    classes: dict[str, dict[str, dict[str, str]]] = {}
    for source in sorted(models_dir.glob("*.py")):
        for node in ast.parse(source.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ClassDef):
                continue
            literals = {
                statement.targets[0].id: ast.literal_eval(statement.value)
                for statement in node.body
                if isinstance(statement, ast.Assign)
                and isinstance(statement.targets[0], ast.Name)
                and statement.targets[0].id in ("openapi_types", "attribute_map")
            }
            if literals.get("openapi_types"):  # V1Time and the like have none: Kubernetes types, checked as such
                classes[node.name] = literals
    return classes


def reachable_fields(classes: dict[str, dict[str, dict[str, str]]]) -> dict[str, dict[str, str]]:
    """{class: {JSON key: openapi type}} for the classes reachable from ROOT_TYPE."""
    fields: dict[str, dict[str, str]] = {}
    pending = [ROOT_TYPE]
    while pending:
        name = pending.pop()
        if name in fields or name not in classes:
            continue
        types, keys = classes[name]["openapi_types"], classes[name]["attribute_map"]
        fields[name] = {keys[attribute]: types[attribute] for attribute in sorted(types, key=keys.__getitem__)}
        pending.extend(inner for each in types.values() for inner in type_names(each))
    return dict(sorted(fields.items()))


def _sdk_version(site: Path) -> str:
    for metadata in site.glob("kserve-*.dist-info/METADATA"):
        for line in metadata.read_text(encoding="utf-8").splitlines():
            if line.startswith("Version: "):
                return line.removeprefix("Version: ")
    raise SystemExit(f"no kserve-*.dist-info in {site}: install it there with pip install --no-deps --target")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="folder holding the kserve package (pip install --target)")
    site = parser.parse_args().site
    fields = reachable_fields(class_literals(site / "kserve" / "models"))
    document = {
        "source": f"kserve=={_sdk_version(site)} (PyPI): openapi_types and attribute_map of kserve/models/*.py",
        "regenerate": "python -m tests.deploy.generate_kserve_fields, as its docstring says",
        "api_version": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "root": ROOT_TYPE,
        "types": fields,
    }
    FIELDS_FILE.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(f"{FIELDS_FILE}: {len(fields)} types from {document['source']}")


if __name__ == "__main__":
    main()
