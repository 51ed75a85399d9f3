"""Tools as console scripts: exit codes and one-line error messages instead of tracebacks."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


from helpers import REPO_ROOT


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"melhubert_fairseq.tools.{name}", *args], capture_output=True, text=True, timeout=300
    )


def test_success_exits_zero_and_user_errors_print_one_line(tmp_path):
    (tmp_path / "feats").mkdir()
    np.save(tmp_path / "feats" / "utt1.npy", np.zeros((12, 40), np.float32))
    args = ["--feature-dir", str(tmp_path / "feats"), "--out-dir", str(tmp_path / "out"), "--split", "train"]
    first = run_tool("create_manifest", *args)
    assert first.returncode == 0, first.stderr  # main() returns a dict; the console script still exits 0
    assert "listed 1 utterances" in first.stdout

    again = run_tool("create_manifest", *args)
    assert again.returncode == 2
    assert "error: " in again.stderr and "already exists; refusing to overwrite" in again.stderr
    assert "Traceback" not in again.stderr

    missing = run_tool("wav_to_fbank", "--manifest", str(tmp_path / "nope.tsv"), "--out-dir", str(tmp_path / "x"))
    assert missing.returncode == 2 and "nope.tsv" in missing.stderr and "Traceback" not in missing.stderr


def test_demo_of_a_regular_install_runs_in_a_checkout_and_refuses_elsewhere(tmp_path):
    """pip's regular install holds the package (tools/ as melhubert_fairseq.tools) but not demo/corpus or config/:
    from a folder outside any checkout the demo stops with one error line, inside a checkout it uses that one."""
    site = tmp_path / "site"  # what a wheel installs: setup.py's build_py output
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp_path / "build"), "--build-lib", str(site)],
        cwd=REPO_ROOT, check=True, capture_output=True, timeout=300,
    )
    # The regular install holds every module of the package and every tool (none left out of setup.py's list).
    package_root = REPO_ROOT / "melhubert_fairseq"
    modules = {p.relative_to(package_root) for p in package_root.rglob("*.py")}
    modules |= {Path("tools") / p.name for p in (REPO_ROOT / "tools").glob("*.py")}
    missing = sorted(str(m) for m in modules if not (site / "melhubert_fairseq" / m).is_file())
    assert not missing, missing
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    refused = subprocess.run(
        [sys.executable, "-m", "melhubert_fairseq.tools.run_demo", "--out-dir", str(elsewhere / "run")],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the demo needs a melhubert-fairseq checkout: pip does not install"), lines
    assert not (elsewhere / "run").exists()
    # In a subfolder of a checkout, the installed demo (not this checkout's code) finds the checkout above it.
    code = (
        "from melhubert_fairseq.tools import run_demo; "
        "print(run_demo.PLUGIN_DIR); print(run_demo.find_checkout()); print(run_demo.build_parser().format_help())"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT / "demo", env=env, capture_output=True, text=True, timeout=300
    )
    assert found.returncode == 0, found.stderr
    plugin_dir, checkout, usage = found.stdout.split("\n", 2)
    assert (plugin_dir, checkout) == (str(site / "melhubert_fairseq"), str(REPO_ROOT))
    assert "--out-dir" in usage and "default: demo_run in the checkout" in usage


def console_scripts():
    """(script, module, function) of every console script setup.py declares."""
    return re.findall(r'"(melhubert-[\w-]+) = ([\w.]+):(\w+)"', (REPO_ROOT / "setup.py").read_text())


#: Runs every tool's --help in one interpreter and prints, per tool, the heavy packages it pulled in.
HELP_PROBE = """
import contextlib, importlib, io, json, sys
report = {}
for script, module, function in json.loads(sys.argv[1]):
    out = io.StringIO()
    sys.argv = [script]  # argparse names the program after it, as the console script does
    with contextlib.redirect_stdout(out):
        try:
            getattr(importlib.import_module(module), function)(["--help"])
        except SystemExit:
            pass
    loaded = [name for name in ("fairseq", "torch", "sklearn", "faiss") if name in sys.modules]
    report[script] = {"usage": out.getvalue().startswith("usage: " + script), "loaded": loaded}
print(json.dumps(report))
"""


def test_help_of_every_tool_imports_neither_fairseq_nor_torch(tmp_path):
    # Packages a tool imports stay in sys.modules, so the first tool listed as loading one is the culprit.
    scripts = console_scripts()
    assert len(scripts) >= 13
    result = subprocess.run([sys.executable, "-c", HELP_PROBE, json.dumps(scripts)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert {script: entry["loaded"] for script, entry in report.items() if entry["loaded"]} == {}
    assert all(entry["usage"] for entry in report.values()), report
    assert result.stderr == ""  # no warnings either


@pytest.mark.parametrize(
    "imports",
    [
        # the package first, then fairseq: registration is one explicit call
        "import melhubert_fairseq\nfrom fairseq import checkpoint_utils\nmelhubert_fairseq.register_with_fairseq()",
        # fairseq first (as when fairseq imports the plugin through common.user_dir): importing it registers
        "from fairseq import checkpoint_utils\nimport melhubert_fairseq",
        # a plugin module pulls fairseq in before the package registered: the explicit call still works
        "import melhubert_fairseq.models.components\nfrom fairseq import checkpoint_utils\n"
        "import melhubert_fairseq\nmelhubert_fairseq.register_with_fairseq()",
    ],
    ids=["package-then-fairseq", "fairseq-then-package", "plugin-module-pulls-fairseq"],
)
def test_the_plugin_registers_with_fairseq_whichever_is_imported_first(tiny_checkpoint, tmp_path, imports):
    code = imports + f"""
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.tasks import TASK_REGISTRY
assert "hard_label_masked_ce" in CRITERION_REGISTRY and "mel_hubert_pretraining" in TASK_REGISTRY
assert checkpoint_utils.load_checkpoint_to_cpu.__module__ == "melhubert_fairseq.fairseq_patches"
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([{str(tiny_checkpoint)!r}])
print(type(models[0]).__name__, type(task).__name__)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["MelHubertModel", "MelHubertPretrainingTask"]


def test_console_scripts_print_user_errors_as_one_line_and_let_bugs_keep_their_traceback(monkeypatch, capsys):
    """A user mistake (InputError, a missing file) is one ``error:`` line and exit 2; anything else, a plain
    ValueError included, is a bug and propagates with its traceback; MELHUBERT_TRACEBACK=1 shows it for both."""
    from melhubert_fairseq.cli import TRACEBACK_ENV, console_main
    from melhubert_fairseq.errors import InputError

    def failing(err):
        def main(argv):
            raise err
        return console_main(main)

    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    assert failing(InputError("a.tsv:3 (utt1): 12 frames, expected 40 mel bins"))() == 2
    assert capsys.readouterr().err == "error: a.tsv:3 (utt1): 12 frames, expected 40 mel bins\n"
    assert failing(FileNotFoundError("train.tsv is missing"))() == 2
    assert capsys.readouterr().err == "error: train.tsv is missing\n"
    with pytest.raises(ValueError, match="a bug"):
        failing(ValueError("a bug"))()
    with pytest.raises(OSError, match="no file named"):  # an OSError naming no file is no file problem of the user's
        failing(OSError("no file named"))()
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(InputError):
        failing(InputError("x.tsv:1: bad"))()
