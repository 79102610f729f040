"""`python -m data.inspect` shows which tokens train without colour too: piped, trained spans are
marked in the text (between ⟦ and ⟧) and the legend says so; its numbers are checked."""

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
