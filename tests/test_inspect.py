"""`python -m data.inspect` shows which tokens train without colour too: piped, trained spans are
marked in the text (between ⟦ and ⟧) and the legend says so; its numbers are checked. A KTO file
shows each completion marked and titled desirable or undesirable; its --json rows carry the label."""

import json

import pytest

from data.inspect import CLOSE, OPEN, main


def test_piped_output_marks_the_trained_tokens(tiny_chat_dir, chat_data, capsys):
    assert main(["--model", str(tiny_chat_dir), "--data", str(chat_data), "--n", "1"]) == 0
    out = capsys.readouterr().out  # captured: not a terminal
    marked = out[out.index(OPEN) + 1:out.index(CLOSE)]
    assert "Ahoy! 0 plus 0 is 0." in marked  # the assistant's reply is the trained span
    assert "What is 0 plus 0?" not in marked  # the user's turn is not
    assert f"{OPEN} {CLOSE}: trained tokens" in out and "green" not in out


@pytest.mark.parametrize("flags, message", [(["--n", "-1"], "--n"), (["--max-seq-len", "0"], "--max-seq-len"),
                                            (["--n", "two"], "--n")])
def test_bad_numbers_are_refused(tiny_chat_dir, chat_data, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tiny_chat_dir), "--data", str(chat_data), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture
def kto_data(tmp_path):
    """Two unpaired records: a desirable completion, then an undesirable one."""
    rows = [{"prompt": "What is 1 plus 1?", "completion": "Ahoy! 1 plus 1 is 2. Fair winds!", "label": True},
            {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
             "completion": [{"role": "assistant", "content": "It is 4."}], "label": False}]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kto_file_shows_completions_titled_desirable_or_undesirable(tiny_chat_dir, kto_data, capsys):
    assert main(["--model", str(tiny_chat_dir), "--data", str(kto_data)]) == 0
    out = capsys.readouterr().out
    assert "line 1 desirable:" in out and "line 2 undesirable:" in out
    marked = [out[i + 1:out.index(CLOSE, i)] for i in range(len(out)) if out[i] == OPEN]
    assert marked[0].startswith("Ahoy! 1 plus 1 is 2. Fair winds!") and marked[1].startswith("It is 4.")
    assert not any("plus 2?" in m or "plus 1?" in m for m in marked)  # prompts are never marked
    flat = " ".join(out.split())  # rich wraps the legend and the summary at the console's width
    assert f"{OPEN} {CLOSE}: the completion KTO scores" in flat and "green" not in out
    assert "1 desirable, 1 undesirable" in flat and "2 KL rows" in flat


def test_kto_json_lines_hold_completion_ids_labels_and_the_label(tiny_chat_dir, kto_data, capsys):
    assert main(["--model", str(tiny_chat_dir), "--data", str(kto_data), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [sorted(r) for r in rows] == [["completion_ids", "completion_labels", "label"]] * 2
    assert [r["label"] for r in rows] == [True, False]
    assert all(len(r["completion_ids"]) == len(r["completion_labels"]) for r in rows)
