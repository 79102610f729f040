"""train.py --eval-only: a run's closing evaluation of any adapter or merged model, training nothing.

The proof is the run itself: scoring a finished run's adapter on its held-out data gives the
validation loss its last step logged (the same batches, the same float32 A and B under the same
dtype), and the model merge.py makes of it gives the same loss to the merge's rounding."""

import json
import subprocess
import sys

import pytest

import train as train_module
from conftest import ROOT
from test_train import config
from training.loop import train

RUN = dict(max_steps=3, val_fraction=0.25, template="deepseek")  # another template than the base's


@pytest.fixture(scope="module")
def finished(tiny_chat_dir, chat_data, tmp_path_factory):
    """A finished run that held out a quarter of the data, with DeepSeek's template (the base's is
    ChatML): its summary, and its directory."""
    out = tmp_path_factory.mktemp("eval") / "run"
    train(config(tiny_chat_dir, chat_data, out, save_every=1, keep_checkpoints=5, **RUN))
    return json.loads((out / "summary.json").read_text()), out


def score(*flags, capsys) -> tuple[dict, str]:
    """train.py's main with --eval-only and flags: its JSON (stdout) and its report (stderr)."""
    capsys.readouterr()
    train_module.main(["--eval-only", "--precision", "fp32", "--device", "cpu", *map(str, flags)])
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def run_flags(tiny_chat_dir, chat_data, **kw):
    settings = {"model": tiny_chat_dir, "data": chat_data, "val_fraction": 0.25, "template": "deepseek",
                "sample_prompts": "", **kw}
    return [x for k, v in settings.items() if v is not None for x in (f"--{k.replace('_', '-')}", v)]


def snapshot(*dirs) -> dict:
    return {p: p.stat().st_mtime_ns for d in dirs for p in d.rglob("*")}


def test_an_adapter_scores_what_its_run_measured_last(finished, tiny_chat_dir, chat_data, capsys):
    """The run's directory as --adapter (its final adapter), the same split (--val-fraction,
    --val-seed) and template: the loss of the run's last evaluation. Equal to float rounding only:
    the same batches in the same order on the same kernels, so any difference is a defect (1e-6 is
    far above fp32's reordering of a 3-step run's sums, far below what a different split or
    template changes). Nothing is written: not in the run, not beside the data."""
    summary, out = finished
    before = snapshot(out, tiny_chat_dir, chat_data.parent)
    result, report = score("--adapter", out, *run_flags(tiny_chat_dir, chat_data), capsys=capsys)
    assert result["adapter"] == str(out / "adapter")
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert result["val_ppl"] == pytest.approx(summary["val_ppl"], rel=1e-6)
    assert result["examples"] == 6 and result["trained_tokens"] > 0
    assert "the 0.25 that training holds out" in report and "val_loss" in report
    assert snapshot(out, tiny_chat_dir, chat_data.parent) == before
    # --model defaults to the base the adapter records; its template is the adapter's
    again, _ = score("--adapter", out / "adapter", "--data", chat_data, "--val-fraction", 0.25,
                     "--sample-prompts", "", capsys=capsys)
    assert again["model"] == str(tiny_chat_dir.resolve()) and again["val_loss"] == result["val_loss"]
    # the run's own settings as --config: its model, data, split and template
    own, _ = score("--config", out / "run_config.json", "--adapter", out, "--sample-prompts", "", capsys=capsys)
    assert own["val_loss"] == result["val_loss"] and own["examples"] == 6
    # the base alone scores worse than the fine-tune on the same examples
    base, _ = score(*run_flags(tiny_chat_dir, chat_data), capsys=capsys)
    assert base["adapter"] is None and base["val_loss"] > result["val_loss"] + 0.1


def test_a_merged_model_scores_as_its_adapter(finished, tiny_chat_dir, chat_data, tmp_path, capsys):
    """merge.py's model (the run's directory as --adapter) scores the adapter's loss, to the
    rounding of W0 + s B A in float32 (relative 1e-5 on a loss near 1: a few ulps per weight)."""
    import merge
    summary, out = finished
    assert merge.main(["--base", str(tiny_chat_dir), "--adapter", str(out), "--output", str(tmp_path / "merged"),
                       "--no-check"]) == 0
    result, _ = score(*run_flags(tmp_path / "merged", chat_data, template=None), capsys=capsys)
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)  # the merged model carries the template


def test_a_whole_file_or_all_of_data(finished, tiny_chat_dir, chat_data, capsys):
    """--val-data scores that file whole; --val-fraction 1 all of --data; a checkpoint's adapter
    scores too, with replies to the validation prompts."""
    _, out = finished
    whole, _ = score("--adapter", out, "--model", tiny_chat_dir, "--val-data", chat_data, capsys=capsys)
    assert whole["examples"] == 24 and whole["data"] == str(chat_data)
    every, _ = score("--adapter", out, "--model", tiny_chat_dir, "--data", chat_data, "--val-fraction", 1,
                     "--sample-prompts", "", capsys=capsys)
    assert every["examples"] == 24 and every["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)
    first, _ = score("--adapter", out / "checkpoints" / "step-000001" / "adapter", "--data", chat_data,
                     "--val-fraction", 1, "--sample-tokens", 2, capsys=capsys)
    assert first["val_loss"] > every["val_loss"]  # one step in, the fit is worse than after three
    assert len(first["replies"]) == 3 and all(p.startswith("What is ") for p in first["replies"])


def test_the_adapters_template_and_a_warning_for_another(finished, tiny_chat_dir, chat_data, capsys):
    """The adapter's own template (DeepSeek's, saved beside it) tokenizes by default; another
    --template scores as asked, with the chat.py warning."""
    _, out = finished
    own, report = score("--adapter", out, "--data", chat_data, "--val-fraction", 0.25, "--sample-prompts", "",
                        capsys=capsys)
    assert "warning" not in report
    other, report = score("--adapter", out, "--data", chat_data, "--val-fraction", 0.25, "--sample-prompts", "",
                          "--template", "chatml", capsys=capsys)
    assert "not the template the adapter was trained with" in report
    assert other["val_loss"] != own["val_loss"]


def test_dpo_scores_rewards_against_the_adapter_switched_off(tiny_chat_dir, tmp_path, capsys):
    """--objective dpo: the run's last validation row (loss, rewards' margin, reward accuracy)
    again, with the run's beta."""
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"Ahoy! {i} plus {i} is {2 * i}.",
             "rejected": f"{2 * i}" + "." * (i % 3 + 1)} for i in range(16)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dpo"
    train(config(tiny_chat_dir, data, out, objective="dpo", dpo_beta=0.5, max_steps=2, val_fraction=0.25, lr=5e-3))
    summary = json.loads((out / "summary.json").read_text())
    result, _ = score("--objective", "dpo", "--dpo-beta", 0.5, "--adapter", out, "--data", data,
                      "--val-fraction", 0.25, "--sample-prompts", "", capsys=capsys)
    assert result["examples"] == 4
    for key in ("val_loss", "val_reward_accuracy", "val_reward_margin"):
        assert result[key] == pytest.approx(summary[key], rel=1e-6, abs=1e-9), key


def cli(*args):
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "{out}"], "--adapter is for --eval-only"),
    (["--eval-only", "--resume"], "--eval-only trains nothing and writes nothing: drop --resume"),
    (["--eval-only", "--allow-other-base"], "--allow-other-base goes with --adapter"),
    (["--eval-only", "--objective", "dpo"], "pass --adapter"),
    (["--eval-only", "--data", "{data}", "--val-fraction", "0"], "--val-fraction 0 holds nothing"),
    (["--eval-only", "--val-fraction", "1.5"], "--val-fraction 1.5: must be in [0, 1]"),
    (["--eval-only", "--adapter", "{missing}"], "nope/adapter_config.json: not found"),
    (["--eval-only", "--adapter", "{missing}", "--model", "{other}"], "nope/adapter_config.json: not found"),
    (["--eval-only", "--adapter", "{cut}"], "pass a checkpoint's, the newest being"),
    (["--eval-only", "--adapter", "{out}", "--model", "{other}"], "pass --allow-other-base"),
])
def test_bad_flags_are_one_line(flags, message, finished, chat_data, tmp_path):
    """Refused before any weight is read, one line, exit 2; a run without its final adapter names
    its newest checkpoint's; another base than the adapter's is refused unless allowed."""
    import shutil
    from conftest import save_tiny_hf
    _, out = finished
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "adapter")
    other = save_tiny_hf(tmp_path / "other", seed=1)
    values = {"out": out, "data": chat_data, "missing": tmp_path / "nope", "cut": cut, "other": other}
    result = cli(*[f.format(**values) for f in flags])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_another_base_with_allow_other_base_warns(finished, tiny_chat_dir, chat_data, tmp_path, capsys):
    import shutil
    from safetensors.torch import load_file, save_file
    _, out = finished
    other = tmp_path / "other"
    shutil.copytree(tiny_chat_dir, other)
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    result, report = score("--adapter", out, "--model", other, "--allow-other-base", "--data", chat_data,
                           "--val-fraction", 1, "--sample-prompts", "", capsys=capsys)
    assert "applying it anyway" in report and result["model"] == str(other)


def test_chat_takes_a_runs_directory_as_its_adapter(finished, tiny_chat_dir, capsys):
    """chat.py --adapter RUN replies as --adapter RUN/adapter (merge.py's case is above)."""
    import chat
    _, out = finished
    replies = []
    for adapter in (out, out / "adapter"):
        capsys.readouterr()
        assert chat.main(["--model", str(tiny_chat_dir), "--adapter", str(adapter), "--prompt", "What is 3 plus 3?",
                          "--max-new-tokens", "4", "--device", "cpu"]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] and replies[0].strip()
