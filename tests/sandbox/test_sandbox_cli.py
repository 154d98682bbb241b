"""``dsv4 sandbox run`` and ``dsv4 sandbox probe`` through the real CLI entry point."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

from dsv4.cli.main import main
from dsv4.sandbox import naming
from layer_support import assert_no_residue


@pytest.fixture
def state_dir():
    """A host state directory; afterwards nothing carrying its host tag may remain."""
    path = tempfile.mkdtemp(prefix="dsv4-sbx-cli-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    assert_no_residue(naming.host_tag(path) + "-", path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("layer", ["function", "container"])
def test_run_prints_output_and_exit_code(layer, state_dir, capfd):
    code = main(["sandbox", "run", "--layer", layer, "--memory-mb", "64", "--state-dir",
                 state_dir, "--", "sh", "-c", "echo out; echo err >&2; exit 7"])
    captured = capfd.readouterr()
    assert code == 7
    assert captured.out == "out\n"
    assert captured.err == "err\n"


def test_run_timeout_exits_124(state_dir, capfd):
    code = main(["sandbox", "run", "--layer", "function", "--timeout-s", "0.5", "--state-dir",
                 state_dir, "--", "sh", "-c", "echo partial; sleep 30"])
    captured = capfd.readouterr()
    assert code == 124
    assert captured.out == "partial\n"
    assert "timed out after 0.5 s" in captured.err


def test_run_without_command_fails(state_dir, capfd):
    assert main(["sandbox", "run", "--state-dir", state_dir]) == 1
    assert "no command given" in capfd.readouterr().err


def test_probe_json_lists_every_layer(capfd):
    main(["sandbox", "probe", "--json"])
    results = json.loads(capfd.readouterr().out)
    assert [r["layer"] for r in results] == ["function", "container", "microvm", "vm"]
    by_layer = {r["layer"]: r for r in results}
    assert by_layer["function"]["available"], by_layer["function"]["reasons"]
    assert by_layer["container"]["available"], by_layer["container"]["reasons"]
