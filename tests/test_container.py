"""The Dockerfile installs this package and exposes its console script (Docker itself does not run here)."""

from __future__ import annotations

import re
import tomllib

from conftest import REPO


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "containers" / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_installs_the_package_and_exposes_its_entry_point() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (script,) = project["scripts"]
    instructions = dockerfile_instructions()
    base = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(base) == 1 and re.search(r":\d+\.\d+\.\d+-cuda", base[0]), "a pinned CUDA base image"
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert re.search(r"pip install [^&]*\s\.(\s|$)", runs), "the package itself is installed"
    copied = " ".join(rest for keyword, rest in instructions if keyword == "COPY")
    assert "pyproject.toml" in copied and project["name"].replace("-", "_") in copied
    entrypoint = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint == [f'["{script}"]']
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
