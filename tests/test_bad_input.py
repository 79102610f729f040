"""train.py and sweeps never lose a run, never mix two, and answer bad input with one line.

One table of the mistakes people make (a reused --output-dir, a changed flag on --resume, a typo in
a config file, a corrupt checkpoint or model file, a full disk, a lock held by another run, Ctrl-C)
run through train.py's own entry point, main(argv), in this process: each case asserts the exit
code, the one-line message naming the culprit, no traceback in stderr (an exception escaping the
boundary would fail the test itself), and that every file that existed before is byte for byte the
same afterwards. Then the cases that must work: --overwrite, a resume that extends the run (logged
in run_history.jsonl, metrics.jsonl cut back to the checkpoint), a stale lock, a run stopped before its
first step (started over), a resume given only --output-dir (the run's own settings).
"""

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from training import checkpoint
import train as train_module
from training import loop as train_loop, phases as train_phases
from training.flags import parse_config
from test_train import config, metrics

BASE = dict(val_fraction=0.0, max_steps=4, micro_batch_size=4, grad_accum=1, lr=1e-2, lora_r=4,
            lora_alpha=8, lora_dropout=0.0, warmup_ratio=0.0, sample_prompts="", precision="fp32",
            device="cpu", save_every=2, keep_checkpoints=5)


def flags(**settings) -> list[str]:
    argv = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        argv += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return argv


def snapshot(root: Path) -> dict:
    """Every file under root: relative path -> its bytes (a run of the tiny model is small)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


GROWS = ("metrics.jsonl", "run_history.jsonl", "tensorboard/")  # a run that trained before failing appends


def run_main(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        train_module.main(argv)
    return exit_.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tiny_chat_dir, chat_data, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_loop.train(config(tiny_chat_dir, chat_data, out, **{**BASE}))
    return out


# --- the table: (id, how to prepare the copy of a finished run, settings, exit code, message) --------
# prepare(run, model, data, tmp) may change files (before the snapshot) and returns settings to add.

def other_data(run, model, data, tmp):
    rows = Path(data).read_text().splitlines()
    (tmp / "other.jsonl").write_text("\n".join(rows[:-1]) + "\n")  # one chat fewer
    return {"data": tmp / "other.jsonl", "resume": True, "max_steps": 6}


def other_base_of_same_shape(run, model, data, tmp):
    other = tmp / "other-model"
    shutil.copytree(model, other)
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5  # same shapes, other weights
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    return {"model": other, "resume": True, "max_steps": 6}


def other_base_changed_mid_file(run, model, data, tmp):
    """A base whose weights differ only in the middle of the file (a merged adapter on o_proj,
    say): the first and last MiB, which the old fingerprint read, are the same."""
    other = tmp / "other-model"
    shutil.copytree(model, other)
    blob = bytearray((other / "model.safetensors").read_bytes())
    assert len(blob) > 4 * 2**20
    blob[len(blob) // 2] ^= 0xFF  # one byte of the embedding table
    (other / "model.safetensors").write_bytes(bytes(blob))
    return {"model": other, "resume": True, "max_steps": 6}


def model_copy_with(name, text):
    def prepare(run, model, data, tmp):
        other = tmp / "broken-model"
        shutil.copytree(model, other)
        if name == "model.safetensors":  # truncated, as a broken download leaves it
            blob = (other / name).read_bytes()
            (other / name).write_bytes(blob[: len(blob) // 2])
        elif name == "tokenizer_config.json":  # the model's own chat template
            cfg = json.loads((other / name).read_text())
            (other / name).write_text(json.dumps({**cfg, "chat_template": text}))
        else:
            (other / name).write_text(text)
        return {"model": other, "output_dir": tmp / "new-run"}
    return prepare


def config_file(text, suffix=".toml"):
    def prepare(run, model, data, tmp):
        (tmp / f"run{suffix}").write_text(text)
        return {"config": tmp / f"run{suffix}"}
    return prepare


def truncate_newest_checkpoint(run, model, data, tmp):
    state = run / "checkpoints" / "step-000004" / checkpoint.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    return {"resume": True, "max_steps": 6}


def hold_lock(run, model, data, tmp):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
    return {"resume": True, "max_steps": 6, "_cleanup": holder.kill}


def full_disk(monkeypatch):
    real_save = torch.save

    def save(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 the start of a zip")
        raise OSError(28, "No space left on device")  # as a full disk raises it mid-write
    monkeypatch.setattr(torch, "save", save)
    return real_save


def interrupt_loading(monkeypatch):
    def load(*a, **kw):
        raise KeyboardInterrupt  # Ctrl-C while the base model loads
    monkeypatch.setattr(train_phases, "load_model", load)


def run_config_edited(edit):
    """The run's run_config.json changed by edit(text) -> text; --resume reads its settings first."""
    def prepare(run, model, data, tmp):
        path = run / "run_config.json"
        path.write_text(edit(path.read_text()))
        return {"resume": True, "max_steps": 6}
    return prepare


def with_defining(**settings):
    return lambda text: json.dumps({**json.loads(text), "defining": {**json.loads(text)["defining"], **settings}})


def same(**settings):
    return lambda run, model, data, tmp: settings


CASES = [
    # nothing is overwritten without being asked
    ("fresh run into a run's directory", same(), 2,
     r"--output-dir .*run: already holds a run \(run_config.json, metrics.jsonl, summary.json, checkpoints/ "
     r"\(step-000002, step-000004\), adapter, tensorboard\); pass --resume to continue it, --overwrite"),
    ("--resume and --overwrite", same(resume=True, overwrite=True), 2, "--resume continues .* pass one"),
    # a resumed run is the same run
    ("resume, other --lr", same(resume=True, max_steps=6, lr=2e-2), 2,
     r"--resume: 1 setting differs from the run in .*: lr 0.01 -> 0.02\. A resumed run must be the same run"),
    ("resume, other --data content", other_data, 2, r"data_sha256 \"?[0-9a-f]{12}"),
    ("resume, other base of the same shape", other_base_of_same_shape, 2, r"model_content_sha256 [0-9a-f]{12}"),
    ("resume, other base changed mid-file", other_base_changed_mid_file, 2,
     r"model_content_sha256 [0-9a-f]{12} -> [0-9a-f]{12} \(the model in \S+/other-model is not the run's base\)"),
    ("resume, other --micro-batch-size", same(resume=True, max_steps=6, micro_batch_size=2), 2,
     "global_micro_batch 4 -> 2"),
    ("resume, several changes", same(resume=True, max_steps=6, seed=1, mask="all", max_seq_len=256), 2,
     r"3 settings differ.*max_seq_len 512 -> 256; mask \"assistant\" -> \"all\"; seed 42 -> 1"),
    ("resume, --quantize nf4", same(resume=True, max_steps=6, quantize="nf4"), 2, "quantize null -> \"nf4\""),
    ("resume a finished run", same(resume=True), 2,
     r"--resume: the run in .* is at step 4 of 4: nothing left to train; raise --max-steps"),
    ("resume with --max-steps below the checkpoint", same(resume=True, max_steps=3), 2, "at step 4 of 3"),
    ("resume, a torn run_config.json", run_config_edited(lambda text: text[: len(text) // 2]), 2,
     r"^train.py: error: --resume: \S+run/run_config.json: not valid JSON \("),
    ("resume, a run_config.json setting of another type", run_config_edited(with_defining(lr="fast")), 2,
     r'--resume: \S+run/run_config.json: lr = "fast": expected a number'),
    # every setting is validated, from flags and config files alike
    ("config file pack = \"false\"", config_file('pack = "false"\n'), 2,
     r"--config .*run.toml: pack = \"false\": expected true or false"),
    ("config file lr = true", config_file('{"lr": true}', ".json"), 2, "lr = true: expected a number"),
    ("config file not TOML", config_file("lr = \n"), 2, r"--config .*run.toml: .*line 1"),
    ("--lr -1", same(lr=-1), 2, r"--lr -1.0: must be in \(0, inf\)"),
    ("--lr nan", same(lr="nan"), 2, r"--lr nan: must be in \(0, inf\)"),
    ("negative warmup", same(warmup_steps=-1), 2, r"--warmup-steps -1: must be in \[0, inf\)"),
    ("epochs 0", same(epochs=0, max_steps=0), 2, r"--epochs 0.0: must be in \(0, inf\)"),
    ("negative max grad norm", same(max_grad_norm=-1), 2, r"--max-grad-norm -1.0: must be in \[0, inf\)"),
    ("dropout 1", same(lora_dropout=1), 2, r"--lora-dropout 1.0: must be in \[0, 1\)"),
    ("missing --data", same(data="no-such.jsonl"), 2, "--data no-such.jsonl: no such file"),
    ("missing --sample-prompts", same(sample_prompts="typo.txt"), 2, "--sample-prompts typo.txt: no such file"),
    # settings the model bounds, refused before any data or weight is read
    ("--max-seq-len beyond the model's context", same(resume=True, max_steps=6, max_seq_len=2048), 2,
     r"--max-seq-len 2048: more than the model's context \(max_position_embeddings 1024 in .*config.json\); "
     r"pass at most 1024"),
    ("--lora-r beyond a target's smaller side", same(resume=True, max_steps=6, lora_r=64), 2,
     r"--lora-r 64: larger than model.layers.0.self_attn.k_proj allows \(64 in, 32 out\): the largest rank is "
     r"32, .*8 to 64 is typical"),
    ("--data a directory", lambda run, model, data, tmp: {"data": tmp}, 2, r"--data .*: a directory, not a data file"),
    ("--model an adapter", lambda run, model, data, tmp: {"model": run / "adapter", "output_dir": tmp / "new"}, 2,
     r"run/adapter: a LoRA adapter, not a model: pass its base \(\S+\) as the model and this as --adapter"),
    ("--model a run's directory", lambda run, model, data, tmp: {"model": run, "output_dir": tmp / "new"}, 2,
     r"run: a training run's directory, not a model: pass its base \(\S+tiny\S*\) as the model and this as "
     r"--adapter \(chat.py; train.py --eval-only to score it\)"),
    # outputs and inputs are checked
    ("newest checkpoint truncated", truncate_newest_checkpoint, 2,
     r"checkpoint .*step-000004 does not load \(.*\); the previous checkpoint is .*step-000002: move "
     r"step-000004 away"),
    ("truncated model.safetensors", model_copy_with("model.safetensors", None), 2,
     r"broken-model/model.safetensors"),
    ("corrupt tokenizer.json", model_copy_with("tokenizer.json", '{"version": "1.0", '), 2,
     r"broken-model/tokenizer.json"),
    ("chat template that divides by zero", model_copy_with("tokenizer_config.json", "{{ 1 / 0 }}"), 2,
     r"broken-model.*division by zero"),
    # one run per directory
    ("a live run holds the lock", hold_lock, 2, r"--output-dir .*run: in use by process \d+ on "),
    # errors at the boundary
    # (steps 5 and 6 ran: their rows and TensorBoard events are kept, to be cut by the next resume)
    ("full disk during a checkpoint", same(resume=True, max_steps=6, _patch=full_disk, _may_grow=GROWS), 2,
     r"step-000006: could not be written \(No space left on device \(free some space, or write "
     r"elsewhere\)\); the previous checkpoint .*step-000004 is kept"),
    ("Ctrl-C while loading the model", same(resume=True, max_steps=6, _patch=interrupt_loading), 130,
     r"^train.py: interrupted$"),
]


@pytest.mark.parametrize("prepare, code, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(prepare, code, message, finished_run, tiny_chat_dir, chat_data, tmp_path, capsys,
                   monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    extra = prepare(run, tiny_chat_dir, chat_data, tmp_path)
    cleanup, patch, grows = extra.pop("_cleanup", None), extra.pop("_patch", None), extra.pop("_may_grow", ())
    settings = {**BASE, "model": tiny_chat_dir, "data": chat_data, "output_dir": run, **extra}
    if "config" in settings:  # the file's settings must not be overridden by flags
        settings = {"config": settings["config"], "output_dir": tmp_path / "new-run"}
    before = {"run": snapshot(run), "tmp": {p.name for p in tmp_path.iterdir()}}
    if patch:
        patch(monkeypatch)
    try:
        exit_code, err = run_main(flags(**settings), capsys)
    finally:
        cleanup and cleanup()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("train.py")]
    assert exit_code == code and len(errors) == 1, err[-2000:]
    assert re.search(message, errors[0]), errors[0]
    after = snapshot(run)
    for name, old in before["run"].items():  # nothing that was there changed (a log may have grown)
        assert after.get(name) == old or name.startswith(grows) and after.get(name, b"").startswith(old), name
    assert {n for n in set(after) - set(before["run"]) if not n.startswith(grows)} == set()  # nor was added
    assert {p.name for p in tmp_path.iterdir()} == before["tmp"]  # no new output directory either


# --- what must work ---------------------------------------------------------------------------------

def test_overwrite_replaces_the_run(finished_run, tiny_chat_dir, chat_data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "notes.txt").write_text("mine")  # not a run file: kept
    (run / "checkpoints" / "step-000010").mkdir()  # an older run's later checkpoint: must not survive
    train_module.main(flags(**{**BASE, "model": tiny_chat_dir, "data": chat_data, "output_dir": run,
                               "max_steps": 2, "overwrite": True}))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert [m["step"] for m in metrics(run)] == [1, 2]
    assert (run / "notes.txt").read_text() == "mine" and not (run / ".lock").exists()


def test_resume_may_extend_the_run_and_says_so(finished_run, tiny_chat_dir, chat_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "checkpoints" / "step-000004")  # stopped after the step-2 checkpoint...
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # ...with later rows and a line torn by a kill
    stale = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    (run / ".lock").write_text(json.dumps({"pid": int(stale.stdout), "host": socket.gethostname()}))
    run_config = (run / "run_config.json").read_bytes()
    train_module.main(flags(**{**BASE, "model": tiny_chat_dir, "data": chat_data, "output_dir": run,
                               "resume": True, "max_steps": 6, "log_every": 2}))
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]  # each step once
    assert (run / "run_config.json").read_bytes() == run_config  # the run's record is not rewritten
    history = [json.loads(line) for line in (run / "run_history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["resumed_at_step"] == 2
    assert history[0]["changed"] == {"max_steps": [4, 6], "log_every": [1, 2], "total_steps": [4, 6],
                                     "output_dir": [str(finished_run), str(run)]}  # copied elsewhere
    assert not (run / ".lock").exists()  # the stale lock was taken over, then released


def test_a_run_stopped_before_its_first_step_is_no_run(tiny_chat_dir, chat_data, tmp_path, capsys, monkeypatch):
    """Ctrl-C before step 1 leaves run_config.json, metrics.jsonl (the evaluation before training)
    and tensorboard/, no checkpoint: the same command starts the run over, and so does --resume
    (from step 0); the user's own files in the directory stay."""
    def interrupt(*a, **kw):
        raise KeyboardInterrupt  # Ctrl-C in the first step
    argv = flags(**{**BASE, "model": tiny_chat_dir, "data": chat_data, "val_fraction": 0.25})
    for again in ([], ["--resume"]):
        run = tmp_path / f"run{len(again)}"
        with monkeypatch.context() as patched:
            patched.setattr(train_loop, "train_step", interrupt)
            code, err = run_main(argv + ["--output-dir", str(run)], capsys)
        assert code == 130 and "Traceback" not in err, err[-2000:]
        assert {"run_config.json", "metrics.jsonl", "tensorboard"} <= {p.name for p in run.iterdir()}
        assert [m["step"] for m in metrics(run)] == [0]
        (run / "notes.txt").write_text("mine")
        train_module.main(argv + ["--output-dir", str(run), *again])
        assert [m["step"] for m in metrics(run)] == [0, 1, 2, 3, 4]
        assert (run / "notes.txt").read_text() == "mine" and not (run / "run_history.jsonl").exists()


def cut_at_step_2(finished_run, run):
    """A copy of the finished run as a kill after its step-2 checkpoint leaves it."""
    shutil.copytree(finished_run, run)
    for name in ("checkpoints/step-000004", "adapter"):
        shutil.rmtree(run / name)
    (run / "summary.json").unlink()


def test_resume_needs_only_the_output_dir(finished_run, tmp_path):
    """`train.py --output-dir RUN --resume`: every setting not given is the run's own (run_config.json),
    and the run ends as it did uninterrupted."""
    run = tmp_path / "run"
    cut_at_step_2(finished_run, run)
    train_module.main(["--output-dir", str(run), "--resume"])
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    a, b = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (finished_run, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads(line) for line in (run / "run_history.jsonl").read_text().splitlines()]
    assert history[0]["changed"] == {"output_dir": [str(finished_run), str(run)]}  # nothing else differs


def test_resume_takes_the_settings_as_the_last_resume_left_them(finished_run, tmp_path):
    run = tmp_path / "run"
    cut_at_step_2(finished_run, run)
    (run / "run_history.jsonl").write_text(json.dumps({"resumed_at_step": 2, "changed": {"max_steps": [4, 6]}}) + "\n")
    cfg = parse_config(["--output-dir", str(run), "--resume", "--log-every", "3"])
    assert (cfg.max_steps, cfg.log_every, cfg.lr, cfg.resume) == (6, 3, 1e-2, True)  # flags given win


def test_a_runs_run_config_is_a_config_file(finished_run, tiny_chat_dir, chat_data, tmp_path):
    """--config runs/x/run_config.json: the run's settings (not its fingerprints and counts, nor the
    device it resolved: this machine's --device auto picks again)."""
    cfg = parse_config(["--config", str(finished_run / "run_config.json"),
                                     "--output-dir", str(tmp_path / "again")])
    assert cfg == config(tiny_chat_dir, chat_data, tmp_path / "again", **{**BASE, "device": "auto"})


def test_resume_of_a_run_fingerprinted_the_old_way(finished_run, tiny_chat_dir, chat_data, tmp_path):
    """A run_config.json from before every byte was hashed holds model_sha256 (first and last MiB
    of each weight file): compared with that fingerprint, recomputed, the run resumes."""
    from model.fingerprint import legacy_model_fingerprint
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    saved = json.loads((run / "run_config.json").read_text())
    del saved["defining"]["model_content_sha256"]
    saved["defining"]["model_sha256"] = legacy_model_fingerprint(tiny_chat_dir)
    (run / "run_config.json").write_text(json.dumps(saved))
    train_module.main(flags(**{**BASE, "model": tiny_chat_dir, "data": chat_data, "output_dir": run,
                               "resume": True, "max_steps": 6}))
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_every_adapter_records_its_base(finished_run, tiny_chat_dir):
    """nanolora_base.json beside the final adapter and each checkpoint's: the base's directory and
    the fingerprint --resume compares (merge.py and chat.py check it: test_fingerprint.py)."""
    fingerprint = json.loads((finished_run / "run_config.json").read_text())["defining"]["model_content_sha256"]
    adapters = [finished_run / "adapter", *sorted((finished_run / "checkpoints").glob("step-*/adapter"))]
    assert len(adapters) == 3
    for adapter in adapters:
        record = json.loads((adapter / "nanolora_base.json").read_text())
        assert record == {"path": str(tiny_chat_dir.resolve()), "fingerprint": fingerprint}, adapter


def test_safetensors_files_get_the_mode_of_their_neighbours(finished_run):
    """safetensors' save_file creates 0600 files; a run's adapters get the mode of the JSON beside them."""
    adapters = [finished_run / "adapter", *sorted((finished_run / "checkpoints").glob("step-*/adapter"))]
    modes = {a.name: ((a / "adapter_model.safetensors").stat().st_mode & 0o777,
                      (a / "adapter_config.json").stat().st_mode & 0o777) for a in adapters}
    assert all(weights == config for weights, config in modes.values()), modes


def test_help_says_what_each_flag_does_and_its_default(capsys):
    try:
        train_module.main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "LoRA / QLoRA fine-tuning of a Llama-family model. Settings come from" in out
    assert "(default: 0.001)" in out and "(default: demo)" in out  # --lr, --model
    assert "how many newest checkpoints to keep (0: keep every one) (default: 2)" in out


def test_sweep_refuses_a_directory_holding_a_sweep(tmp_path, capsys):
    out = tmp_path / "sweep"
    (out / "lr=0.001").mkdir(parents=True)
    (out / "lr=0.001" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = snapshot(out)
    code, err = run_main(["--sweep", "lr=1e-3,2e-3", "--output-dir", str(out)], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"train.py: error: --output-dir {out}: already holds a sweep (lr=0.001); pass --resume" in err
    assert snapshot(out) == before
