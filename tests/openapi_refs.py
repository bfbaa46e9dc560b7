"""A check both OpenAPI documents' tests share: every ``$ref`` in the document resolves."""

from __future__ import annotations


def refs_of(node, found: list[str] | None = None) -> list[str]:
    """Every ``$ref`` value anywhere in ``node`` (a JSON document)."""
    found = [] if found is None else found
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                found.append(value)
            else:
                refs_of(value, found)
    elif isinstance(node, list):
        for item in node:
            refs_of(item, found)
    return found


def assert_refs_resolve(doc: dict) -> None:
    refs = refs_of(doc)
    assert refs
    for ref in refs:
        target = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
