"""GRPO's steps (--objective grpo): sampling, rewarding and the completion micro-batches that
training/step.train_step trains on with GRPOLoss (training/grpo.py, the loss).

A generation, every --grpo-iterations optimizer steps:

    prompts   the step's grad_accum micro-batches of micro_batch_size prompts (the data stream)
    sample    G = --grpo-group-size completions of each, all the step's prompts in ONE batch
              (model/generate.sample_completions), so the draws do not depend on how the step is cut
              into micro-batches: micro_batch_size 2 x grad_accum 1 samples what 1 x 2 does (the
              sampling batch is grad_accum x micro_batch_size x G rows, its KV cache with it)
    reward    each completion's text (decoded without its stop token) scored by the --reward
              functions (training/rewards.score), and turned into advantages within its group
    batches   each prompt micro-batch's completions as one micro-batch of micro_batch_size x G rows
              (prompt + completion, labels on the completion), with the sampling pass's log-probs
              (pi_old) and each row's advantage, kept on the CPU

then each of the generation's grpo_iterations optimizer steps trains on those batches. Sampling
draws from a CPU torch.Generator seeded with --seed, whose state every checkpoint saves.

Resume: a checkpoint holds, in grpo_generation.safetensors, that generator's state and, when it
falls mid-generation (steps left to train on the same completions), the generation's completion
batches and its reward figures; --resume loads them, so a resumed run trains on and samples
exactly what the uninterrupted one does.
"""

import re

import torch
from safetensors import safe_open

import data
from model.generate import sample_completions
from model.loss import IGNORE_INDEX

from .batches import step_batch
from .checkpoint import CheckpointError
from .grpo import count_completions, group_advantages
from .rewards import load_rewards, score

GENERATION_FILE = "grpo_generation.safetensors"
SAMPLES = 2  # the completions of each generation logged as text (metrics.COMPLETIONS_FILE, TensorBoard)


def start(cfg, ds, run, model, logs, checkpoint, step: int):
    """GRPO's Generations for the run (restored from the checkpoint with --resume); None for the
    other objectives."""
    if cfg.objective != "grpo":
        return None
    generations = Generations(cfg, ds, run, model, logs)
    if checkpoint:
        generations.restore(checkpoint, step)
    return generations


def reward_keys(rewards) -> list[str]:
    """Each reward function's metric name: reward_<function> (JSON- and TensorBoard-safe), the whole
    module:function spelled out where two functions share a name."""
    short = [re.sub(r"\W", "_", r.name.split(":")[-1]) for r in rewards]
    return [f"reward_{s}" if short.count(s) == 1 else "reward_" + re.sub(r"\W", "_", r.name)
            for s, r in zip(short, rewards)]


def completion_text(tok, completion) -> str:
    """A completion's text as the rewards see it: decoded without its stop token."""
    return tok.decode(completion.token_ids[:-1] if completion.stopped else completion.token_ids)


def completion_batch(examples: list[dict], completions: list, advantages: torch.Tensor, pad_id: int) -> dict:
    """Completions as rows (prompt + completion, right-padded; labels on the completion, its stop
    token included), with old_logps (N,): the sampled tokens' log-probs, row by row, and the
    advantages (R,), one per row; on the CPU."""
    rows = []
    for c in completions:
        prompt = examples[c.prompt_index]["prompt_ids"]
        rows.append({"input_ids": prompt + c.token_ids, "labels": [IGNORE_INDEX] * len(prompt) + c.token_ids})
    batch = data.collate(rows, pad_id)
    batch.update(old_logps=torch.cat([c.logps.detach().float() for c in completions]).cpu(),  # one copy
                 advantages=advantages.float().clone())
    return batch


class Generations:
    """The sampling side of a GRPO run: the generator, the current generation's completion batches
    (CPU) and its figures (what the steps trained on it log)."""

    def __init__(self, cfg, ds, run, model, logs):
        self.cfg, self.tok, self.run, self.model, self.logs = cfg, ds.tok, run, model, logs
        self.rewards = load_rewards(cfg.reward, cfg.reward_weights)
        self.keys = reward_keys(self.rewards)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.batches, self.figures = [], {}
        self.on_device = None  # the generation's batches counted and on the device, once for all its steps

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) starts a generation."""
        return step % self.cfg.grpo_iterations == 0 or not self.batches

    def step_batches(self, prompt_batches, step: int) -> list[dict]:
        """Step `step`'s completion micro-batches on the device: sampled from prompt_batches (the
        step's prompts) when the step starts a generation, else the generation's again."""
        if self.due(step):
            self.generate([b["prompts"] for b in prompt_batches], step + 1)
            self.on_device = None
        if self.on_device is None:  # (after --resume mid-generation too)
            self.on_device = [step_batch(count_completions(b, self.cfg.grpo_norm), self.run.device)
                              for b in self.batches]
        return self.on_device

    @torch.no_grad()
    def generate(self, prompt_batches: list[list[dict]], step: int):
        cfg, G = self.cfg, self.cfg.grpo_group_size
        examples = [e for b in prompt_batches for e in b]  # the whole step's prompts: one sampling batch
        with self.run.autocast:
            completions = sample_completions(self.model, [e["prompt_ids"] for e in examples], G, cfg.max_new_tokens,
                                             self.tok.stop_ids, temperature=cfg.temperature, top_p=cfg.top_p,
                                             generator=self.generator)
        texts = [completion_text(self.tok, c) for c in completions]
        prompts = [examples[c.prompt_index]["prompt_text"] for c in completions]
        fields = {k: [examples[c.prompt_index]["fields"][k] for c in completions] for k in examples[0]["fields"]}
        total, per_function = score(self.rewards, prompts, texts, fields)  # (N,), (F, N)
        advantages = group_advantages(total, G)  # each prompt's G completions are together, in its micro-batch
        self.batches, start = [], 0
        for batch in prompt_batches:
            n = len(batch) * G
            self.batches.append(completion_batch(examples, completions[start:start + n],
                                                 advantages[start:start + n], self.tok.pad_id))
            start += n
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float64)
        self.figures = {"reward": total.mean().item(), "reward_std": total.view(-1, G).std(dim=1).mean().item(),
                        **{k: per_function[i].mean().item() for i, k in enumerate(self.keys)},
                        "completion_length": lengths.mean().item(), "completion_length_max": lengths.max().item(),
                        "stopped_share": sum(c.stopped for c in completions) / len(completions)}
        self.logs.completions([{"step": step, "prompt": prompts[i], "completion": texts[i],
                                "reward": total[i].item()} for i in range(min(SAMPLES, len(texts)))])

    def checkpoint_files(self, step: int) -> dict:
        """What a checkpoint after `step` steps keeps of the sampling: {file name: tensors}."""
        tensors = {"generator": self.generator.get_state()}
        if step % self.cfg.grpo_iterations:  # mid-generation: the steps left train on these
            for i, batch in enumerate(self.batches):
                tensors.update({f"batch.{i}.{k}": v.contiguous() for k, v in batch.items()})
            tensors["figures"] = torch.tensor(list(self.figures.values()), dtype=torch.float64)
        return {GENERATION_FILE: tensors}

    def restore(self, checkpoint, step: int):
        """--resume: the generator's state and, mid-generation, the generation, from `checkpoint`."""
        path = checkpoint / GENERATION_FILE
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            self.generator.set_state(tensors.pop("generator"))
        except (OSError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"checkpoint {checkpoint} does not load ({path.name}: {e})") from None
        if step % self.cfg.grpo_iterations:
            n = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("batch."))
            self.batches = [{k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"batch.{i}.")}
                            for i in range(n)]
            names = ["reward", "reward_std", *self.keys, "completion_length", "completion_length_max", "stopped_share"]
            self.figures = dict(zip(names, tensors["figures"].tolist()))

