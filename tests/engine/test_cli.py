"""dsv4 generate and dsv4 chat on the tiny random-weight model."""

import io
import json

from dsv4.cli.main import main


def test_generate_json(capsys):
    assert main(["generate", "--model", "tiny", "--prompt", "Hello", "--max-tokens", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["completion_tokens"] == 3
    assert len(result["token_ids"]) == 3
    assert result["finish_reason"] in ("length", "stop")
    assert result["prompt_tokens"] >= 1


def test_generate_prompt_file_is_greedy(tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The sky is")
    outputs = []
    for _ in range(2):
        assert main(["generate", "--model", "tiny", "--prompt-file", str(prompt), "--max-tokens", "2",
                     "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"])
    assert outputs[0] == outputs[1]


def test_chat_reads_turns_until_exit(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi there\n/exit\n"))
    assert main(["chat", "--model", "tiny", "--max-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "model> " in out
