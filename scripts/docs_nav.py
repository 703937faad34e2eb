"""mkdocs hooks: the changelog page, and a nav that takes in pages as they appear.

* ``changelog.md`` is made from the repository's ``CHANGELOG.md`` (one source).
* Pages listed in ``OPTIONAL`` join their section of the nav when the file exists,
  and any other top-level page missing from the nav is added under "More", so a
  new ``docs/*.md`` is never orphaned and a missing one never breaks the build.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent

#: file -> (section or None for the top level, title)
OPTIONAL: dict[str, tuple[str | None, str]] = {
    "deploy.md": ("Guides", "Deploy"),
    "scaling.md": ("Guides", "Scale out"),
    "javascript.md": ("Guides", "JavaScript apps"),
    "security.md": (None, "Security"),
    "reliability.md": (None, "Reliability"),
}
GENERATED = {"changelog.md"}


def _listed(nav: list[Any]) -> set[str]:
    out: set[str] = set()
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            out |= _listed(value)
        elif isinstance(value, str):
            out.add(value)
    return out


def _section(nav: list[Any], name: str) -> list[Any] | None:
    for item in nav:
        if isinstance(item, dict) and name in item and isinstance(item[name], list):
            return item[name]  # type: ignore[no-any-return]
    return None


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem.replace("-", " ").capitalize()


def on_config(config: Any) -> Any:
    nav: list[Any] = config["nav"]
    docs = Path(config["docs_dir"])
    listed = _listed(nav)
    at = next((i for i, it in enumerate(nav) if isinstance(it, dict) and "Protocol" in it), None)
    for name, (section, title) in OPTIONAL.items():
        if name in listed or not (docs / name).exists():
            continue
        target = _section(nav, section) if section else None
        if target is not None:
            target.append({title: name})
        else:
            nav.insert(at if at is not None else len(nav), {title: name})
            at = None if at is None else at + 1
        listed.add(name)
    extra = sorted(
        p.name
        for p in docs.glob("*.md")
        if p.name not in listed and p.name not in GENERATED and not p.name.startswith("_")
    )
    if extra:
        nav.append({"More": [{_title(docs / n): n} for n in extra]})
    return config


def on_files(files: Files, config: Any) -> Files:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "changelog.md", content=text))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    # Pages written for GitHub link to ../README.md or ../CHANGELOG.md; point them home.
    markdown = re.sub(r"\]\(\.\./CHANGELOG\.md\)", "](changelog.md)", markdown)
    return re.sub(r"\]\(\.\./README\.md\)", "](index.md)", markdown)
