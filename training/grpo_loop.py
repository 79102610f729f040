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

then each of the generation's grpo_iterations optimizer steps trains on those batches.

Each prompt's group is drawn from a CPU torch.Generator of its own, seeded from --seed, the step
and the prompt's line in the data file (prompt_seed): its completions depend on the policy alone,
not on the other prompts of the batch, the micro-batch size or the number of ranks.

torchrun: each rank samples, rewards and trains its share of the step's prompts (the data stream's
slice), so two ranks sample what one process does; the figures are of all ranks' completions.

Resume: a checkpoint that falls mid-generation (steps left to train on the same completions) holds,
in grpo_generation.safetensors, every rank's completion batches and the generation's figures;
--resume loads them (with the same number of ranks), and the generations after are seeded as the
uninterrupted run's were, so a resumed run trains on and samples exactly what it would have.
"""

import hashlib
import re
from collections import Counter

import torch
from safetensors import safe_open

import data
from model.generate import sample_completions
from model.loss import IGNORE_INDEX

from . import parallel
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
    advantages (R,), one per row; on the CPU. No completions (a rank's empty share of a micro-batch
    under torchrun): one padding row that trains nothing."""
    if not completions:
        return {**parallel.empty_batch(pad_id), "old_logps": torch.zeros(0), "advantages": torch.zeros(1)}
    rows = []
    for c in completions:
        prompt = examples[c.prompt_index]["prompt_ids"]
        rows.append({"input_ids": prompt + c.token_ids, "labels": [IGNORE_INDEX] * len(prompt) + c.token_ids})
    batch = data.collate(rows, pad_id)
    batch.update(old_logps=torch.cat([c.logps.detach().float() for c in completions]).cpu(),  # one copy
                 advantages=advantages.float().clone())
    return batch


def prompt_seed(seed: int, step: int, line: int, occurrence: int = 0) -> int:
    """The seed of a prompt's group at the generation of `step`: a hash of the run's --seed, the
    step, the prompt's line in its file and, should the step hold it more than once (a data set
    smaller than a step), which time this is (counted per rank)."""
    digest = hashlib.sha256(f"{seed}:{step}:{line}:{occurrence}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # (63 bits: manual_seed takes it)


def prompt_generators(examples: list[dict], seed: int, step: int) -> list[torch.Generator]:
    """A CPU generator for each example's group, seeded by prompt_seed."""
    seen, generators = Counter(), []
    for e in examples:
        generators.append(torch.Generator().manual_seed(prompt_seed(seed, step, e["line"], seen[e["line"]])))
        seen[e["line"]] += 1
    return generators


class Generations:
    """The sampling side of a GRPO run: the current generation's completion batches (CPU) and its
    figures (what the steps trained on it log)."""

    def __init__(self, cfg, ds, run, model, logs):
        self.cfg, self.tok, self.run, self.model, self.logs = cfg, ds.tok, run, model, logs
        self.rewards = load_rewards(cfg.reward, cfg.reward_weights)
        self.keys = reward_keys(self.rewards)
        self.batches, self.figures = [], {}
        self.on_device = None  # the generation's batches counted and on the device, once for all its steps

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) starts a generation."""
        return step % self.cfg.grpo_iterations == 0 or not self.batches

    def step_batches(self, prompt_batches, step: int) -> list[dict]:
        """Step `step`'s completion micro-batches on the device: sampled from prompt_batches (the
        step's prompts, this rank's share) when the step starts a generation, else the generation's again."""
        first = self.due(step)
        if first:
            self.generate([b["prompts"] for b in prompt_batches], step + 1)
            self.on_device = None
        if self.on_device is None:  # (after --resume mid-generation too)
            self.on_device = [step_batch(count_completions(b, self.cfg.grpo_norm), self.run.device)
                              for b in self.batches]
        return [{**b, "on_policy": int(first)} for b in self.on_device]  # (GRPOLoss: pi_old at the first update)

    @torch.no_grad()
    def generate(self, prompt_batches: list[list[dict]], step: int):
        cfg, G = self.cfg, self.cfg.grpo_group_size
        examples = [e for b in prompt_batches for e in b]  # the whole step's prompts: one sampling batch
        completions = []
        if examples:  # (under torchrun a rank's share may be empty)
            with self.run.autocast:
                completions = sample_completions(self.model, [e["prompt_ids"] for e in examples], G, cfg.max_new_tokens,
                                                 self.tok.stop_ids, temperature=cfg.temperature, top_p=cfg.top_p,
                                                 generator=prompt_generators(examples, cfg.seed, step))
        texts = [completion_text(self.tok, c) for c in completions]
        prompts = [examples[c.prompt_index]["prompt_text"] for c in completions]
        if completions:
            fields = {k: [examples[c.prompt_index]["fields"][k] for c in completions] for k in examples[0]["fields"]}
            total, per_function = score(self.rewards, prompts, texts, fields)  # (N,), (F, N)
        else:
            total, per_function = torch.zeros(0, dtype=torch.float64), torch.zeros(len(self.rewards), 0)
        advantages = group_advantages(total, G)  # each prompt's G completions are together, in its micro-batch
        self.batches, start = [], 0
        for batch in prompt_batches:
            n = len(batch) * G
            self.batches.append(completion_batch(examples, completions[start:start + n],
                                                 advantages[start:start + n], self.tok.pad_id))
            start += n
        self.figures = self.summarize(total, per_function, completions)
        self.logs.completions([{"step": step, "prompt": prompts[i], "completion": texts[i],
                                "reward": total[i].item()} for i in range(min(SAMPLES, len(texts)))])

    def summarize(self, total, per_function, completions) -> dict:
        """The generation's figures, over every rank's completions (gathered: the same on each)."""
        mine = (total.tolist(), per_function.tolist(), [len(c.token_ids) for c in completions],
                sum(c.stopped for c in completions))
        ranks = parallel.gather_objects(mine)
        total = torch.tensor([r for t, *_ in ranks for r in t], dtype=torch.float64)
        per_function = [torch.tensor([r for _, f, *_ in ranks for r in f[i]], dtype=torch.float64)
                        for i in range(len(self.keys))]
        lengths = torch.tensor([n for *_, ns, _ in ranks for n in ns], dtype=torch.float64)
        return {"reward": total.mean().item(),
                "reward_std": total.view(-1, self.cfg.grpo_group_size).std(dim=1).mean().item(),
                **{k: per_function[i].mean().item() for i, k in enumerate(self.keys)},
                "completion_length": lengths.mean().item(), "completion_length_max": lengths.max().item(),
                "stopped_share": sum(s for *_, s in ranks) / len(lengths)}

    def checkpoint_files(self, step: int) -> dict:
        """What a checkpoint after `step` steps keeps of the sampling: {file name: tensors}; mid-
        generation, every rank's completion batches (gathered to rank 0, which writes them) and
        the figures. Under torchrun every rank must call this."""
        if not step % self.cfg.grpo_iterations:  # the next step samples anew: nothing to keep
            return {}
        ranks = parallel.gather_objects(self.batches)
        tensors = {f"batch.{r}.{i}.{k}": v.contiguous() for r, batches in enumerate(ranks)
                   for i, batch in enumerate(batches) for k, v in batch.items()}
        tensors["figures"] = torch.tensor(list(self.figures.values()), dtype=torch.float64)
        return {GENERATION_FILE: tensors}

    def restore(self, checkpoint, step: int):
        """--resume mid-generation: this rank's completion batches, and the figures, from `checkpoint`."""
        if not step % self.cfg.grpo_iterations:
            return
        path = checkpoint / GENERATION_FILE
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            figures = tensors.pop("figures")
        except (OSError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"checkpoint {checkpoint} does not load ({path.name}: {e})") from None
        ranks = 1 + max(int(k.split(".")[1]) for k in tensors)
        if ranks != parallel.world_size():
            raise CheckpointError(f"checkpoint {checkpoint} falls mid-generation (--grpo-iterations "
                                  f"{self.cfg.grpo_iterations}), sampled by {ranks} process(es): resume it with "
                                  f"{ranks}, or from a checkpoint at a multiple of {self.cfg.grpo_iterations} steps")
        mine = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.split(".")[1] == str(parallel.rank())}
        n = 1 + max(int(k.split(".")[0]) for k in mine)
        self.batches = [{k.split(".", 1)[1]: v for k, v in mine.items() if k.split(".")[0] == str(i)}
                        for i in range(n)]
        names = ["reward", "reward_std", *self.keys, "completion_length", "completion_length_max", "stopped_share"]
        self.figures = dict(zip(names, figures.tolist()))
