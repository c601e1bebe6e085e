"""The repository builds and runs as a Hugging Face Space: the front matter agrees with requirements.txt and the
repository, requirements.txt installs on its own (the builder installs it before the repository is copied in),
and the app boots as a Space starts it, with nothing installed from the repository."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import gradio
import pytest
from helpers import REPO
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from clip4cir.core.ports import free_port

ARTIFACTS = REPO / "test-artifacts"


def front_matter() -> dict:
    text = (REPO / "README.md").read_text()
    block = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert block, "README.md has no front matter"
    return {k.strip(): v.strip().strip('"') for k, v in (line.split(":", 1) for line in block.group(1).splitlines())}


def requirements() -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    return {Requirement(line).name.lower(): Requirement(line) for line in lines if line}


def test_the_front_matter_agrees_with_the_requirements_and_the_repository():
    meta, needs = front_matter(), requirements()
    assert meta["sdk"] == "gradio" and (REPO / meta["app_file"]).is_file()
    # the Space installs gradio==sdk_version, then requirements.txt: the two must agree
    assert needs["gradio"].specifier.contains(meta["sdk_version"]), (meta["sdk_version"], needs["gradio"])
    assert meta["sdk_version"] == gradio.__version__  # what the tests ran against
    pyproject = (REPO / "pyproject.toml").read_text()
    requires_python = re.search(r'requires-python = "([^"]+)"', pyproject).group(1)
    assert SpecifierSet(requires_python).contains(meta["python_version"] + ".0")
    # nothing in requirements.txt refers to the repository (it is installed before the repository is there)
    for line in (REPO / "requirements.txt").read_text().splitlines():
        assert not line.strip().startswith(("-e", ".", "file:", "/")), line


@pytest.mark.slow
def test_a_simulated_space_build_boots_and_answers(tmp_path):
    """As the Spaces builder does: requirements.txt alone in an empty folder, installed into a fresh virtual
    environment (with the system's site-packages, so the multi-gigabyte torch wheel is not fetched again: every
    line must still resolve from that folder alone), then the repository copied in and ``python app.py`` started
    with the Space's environment; one text and one composed search through gradio_client."""
    from gradio_client import Client
    from helpers import outside_folder
    build = tmp_path / "build"
    build.mkdir()
    shutil.copy(REPO / "requirements.txt", build / "requirements.txt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIP4CIR_", "PYTHONPATH"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    started = time.perf_counter()
    dry = subprocess.run([python, "-m", "pip", "install", "--dry-run", "--no-deps", "-r", "requirements.txt"],
                         cwd=build, env=env, capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stderr[-2000:]
    installed = subprocess.run([python, "-m", "pip", "install", "-q", "-r", "requirements.txt"], cwd=build, env=env,
                               capture_output=True, text=True, timeout=1200)
    assert installed.returncode == 0, installed.stderr[-2000:]
    install_s = time.perf_counter() - started
    not_there = subprocess.run([python, "-c", "import clip4cir"], cwd=build, env=env, capture_output=True, text=True)
    assert not_there.returncode != 0  # nothing was installed from the repository
    home = outside_folder("clip4cir-space-home-")
    app = home / "app"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, app / name)
    port = free_port()
    space_env = {**env, "HOME": str(home), "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(port),
                 "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen([python, "app.py"], cwd=app, env=space_env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        client = None
        while time.perf_counter() - started < 300 and process.poll() is None:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                time.sleep(0.5)
        assert client is not None, process.stdout.read() if process.poll() is not None else "no answer in 300 s"
        first_start_s = time.perf_counter() - started
        text = client.predict(caption="a red striped dress", k=5, api_name="/text_search")
        assert len(text["results"]) == 5
        composed = client.predict(caption="is blue", reference_id=text["results"][0]["id"], k=5,
                                  api_name="/composed_search")
        assert len(composed["results"]) == 5
        assert (home / ".cache" / "clip4cir").is_dir()  # the demo was generated into the home cache
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "space-build.json").write_text(json.dumps({"install_s": round(install_s, 1),
                                                            "first_start_s": round(first_start_s, 1)}))
