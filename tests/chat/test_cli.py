import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.chat_helpers import EOS, FIXTURES, dsml
from dsv4.cli.main import main


def test_encode_prints_golden_text(capsys):
    assert main(["encode", "--messages", str(FIXTURES / "test_input_1.json")]) == 0
    expected = (FIXTURES / "test_output_1.txt").read_text(encoding="utf-8")
    assert capsys.readouterr().out == expected


def test_encode_prints_ids(capsys, tokenizer):
    assert main(["encode", "--messages", str(FIXTURES / "test_input_4.json"), "--mode", "chat",
                 "--ids"]) == 0
    expected = (FIXTURES / "test_output_4.txt").read_text(encoding="utf-8")
    assert json.loads(capsys.readouterr().out) == tokenizer.encode_with_markers(expected)


def test_encode_effort_and_family(tmp_path, capsys):
    path = tmp_path / "messages.json"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}]), encoding="utf-8")
    assert main(["encode", "--messages", str(path), "--effort", "max", "--family",
                 "v4-0731"]) == 0
    assert "Reasoning Effort: Beyond maximum" in capsys.readouterr().out


def test_encode_reports_invalid_message(tmp_path, capsys):
    path = tmp_path / "messages.json"
    path.write_text(json.dumps([{"role": "robot", "content": "hi"}]), encoding="utf-8")
    assert main(["encode", "--messages", str(path)]) == 1
    assert "messages[0].role: unknown role 'robot'" in capsys.readouterr().err


def test_parse_reads_stdin(monkeypatch, capsys, tmp_path):
    import io

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "f"}}]))
    completion = "plan</think>" + dsml('ok⏎⏎<D tool_calls>⏎<D invoke name="f">⏎'
                                       '<D parameter name="n" string="false">2</D parameter>⏎'
                                       "</D invoke>⏎</D tool_calls>") + EOS
    monkeypatch.setattr("sys.stdin", io.StringIO(completion))
    assert main(["parse", "--tools", str(tools)]) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["reasoning_content"] == "plan"
    assert output["content"] == "ok"
    assert output["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"n": 2}'}
    assert output["finish_reason"] == "tool_calls"


@pytest.mark.slow
def test_module_entry_point():
    source = Path(__file__).resolve().parents[2] / "src"
    environment = {**os.environ, "PYTHONPATH": str(source)}
    result = subprocess.run([sys.executable, "-m", "dsv4", "parse", "--mode", "chat"],
                            input="hello" + EOS, capture_output=True, text=True, timeout=120,
                            check=True, env=environment)
    assert json.loads(result.stdout)["content"] == "hello"
