"""A run's data (TrainData: tokenized and split by training/phases.load_data), drawn as
micro-batches across epochs from a saved position (`micro_batch_stream`), a step's micro-batches
collated ahead on a thread (`step_batches`), and each batch counted on the CPU and put on the device
(`step_batch`).
"""

from dataclasses import dataclass

import torch

import data
from model.llama import PackedDocuments, packed_documents
from model.loss import trained_positions

from . import dpo, kto, parallel
from .settings import TrainConfig


@dataclass
class TrainData:
    """The tokenized examples, and the batches the steps and evaluation read."""
    tok: data.ChatTokenizer
    train: list[dict]  # SFT: {"input_ids", "labels"} per example; DPO: a pair (data/preference.py)
    val: list[dict]
    val_file: str | None  # where val came from (None: held out of --data)
    val_batches: list[dict]  # on the device, this rank's share
    pack: bool
    kind: str  # "rows" (SFT), "pairs" (dpo, orpo, simpo: data/preference.py), "unpaired" (kto: data/unpaired.py),
    # "prompts" (grpo: data/prompts.py; a micro-batch is micro_batch_size prompts, which training/grpo_loop.py
    # turns into micro_batch_size x grpo_group_size completion rows)
    device: torch.device  # with its index (cuda:1), for the batches made on the prefetcher's thread
    embed: object = None  # --offload-embeddings: the embedding module, in host memory

    @property
    def lengths(self) -> list[int]:
        """Tokens per example (of a pair, its longer side; of a KTO example, the longer of its completion
        and KL rows: what its rows are padded to)."""
        if self.kind == "pairs":
            return [max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in self.train]
        if self.kind == "unpaired":
            return [max(len(e["completion_ids"]), len(e["kl_ids"])) for e in self.train]
        if self.kind == "prompts":
            return [len(e["prompt_ids"]) for e in self.train]
        return [len(e["input_ids"]) for e in self.train]

    def batch(self, idx: list[int], examples: list[dict] | None = None) -> dict:
        """Micro-batch of examples idx (of the training set, or of `examples`), on the device. A
        rank whose slice of a micro-batch is empty still takes part, on a batch that trains nothing."""
        examples = self.train if examples is None else examples
        if self.kind == "prompts":  # GRPO: the prompts themselves; grpo_loop samples their completions
            return {"prompts": [examples[i] for i in idx]}
        if not idx:
            batch = self.empty_batch(examples)
        elif self.kind == "pairs":
            batch = data.make_pair_batch(examples, idx, self.tok.pad_id)
        elif self.kind == "unpaired":
            batch = data.make_unpaired_batch(examples, idx, self.tok.pad_id)
        else:  # idx of the training set under --pack names rows of examples; of validation, examples
            # (one per row: packing would give the same per-example losses, and it only saves time)
            batch = data.make_batch(examples, idx, self.tok.pad_id, self.pack and examples is self.train)
        if self.embed is not None:  # the rows looked up here, on the host, and copied with the batch
            with torch.no_grad():
                batch["inputs_embeds"] = self.embed(batch["input_ids"])  # (B, T, hidden_size)
        count = {"pairs": dpo.count_pairs, "unpaired": kto.count_unpaired}.get(self.kind, lambda b: b)
        return step_batch(count(batch), self.device)

    def empty_batch(self, examples: list[dict]) -> dict:
        """A rank's micro-batch of no examples: one padding row that trains nothing; no reference
        forward if the other ranks run none (FSDP: all or none)."""
        batch = parallel.empty_batch(self.tok.pad_id)
        precomputed = {"ref_logps": torch.zeros(2)} if "ref_chosen" in examples[0] or "ref_completion" in examples[0] else {}
        if self.kind == "pairs":
            batch.update(pairs=0, **precomputed)
        elif self.kind == "unpaired":
            batch.update(examples=0, kl_input_ids=batch["input_ids"], kl_labels=batch["labels"],
                         desirable=torch.zeros(1, dtype=torch.bool), **precomputed)
        return batch

    def look_up_embeddings(self, embed, micro_batch_size: int):
        """--offload-embeddings: from now on each batch brings its rows of `embed` (in host memory),
        the validation batches made again with theirs."""
        self.embed = embed
        self.make_val_batches(micro_batch_size)

    def make_val_batches(self, micro_batch_size: int):
        """The validation batches, once, on the device (again after DPO's reference log-probs)."""
        if self.kind == "prompts":  # GRPO has no validation loss: evaluate.py answers the prompts and scores them
            self.val_batches = []
            return
        step = micro_batch_size * parallel.world_size()  # under torchrun each rank takes a slice
        parts = [parallel.rank_share(list(range(len(self.val)))[i:i + step], micro_batch_size)
                 for i in range(0, len(self.val), step)]
        self.val_batches = [self.batch(idx, self.val) for idx in parts]


def micro_batch_stream(lengths, cfg: TrainConfig, epoch: int, index: int):
    """Yield (epoch, next index, micro-batch of example indices), across epochs, from a position.

    Under torchrun the micro-batches hold micro_batch_size x world size examples and each rank
    gets its slice (maybe empty at an epoch's end); epoch and index are the same on every rank."""
    while True:
        batches = data.micro_batches(lengths, cfg.micro_batch_size * parallel.world_size(), cfg.seed,
                                     epoch, cfg.group_by_length, cfg.pack, cfg.max_seq_len)
        for i in range(index, len(batches)):
            yield epoch, i + 1, parallel.rank_share(batches[i], cfg.micro_batch_size)
        epoch, index = epoch + 1, 0


def step_batches(ds: TrainData, cfg: TrainConfig, epoch: int, index: int, steps: int):
    """Yield (epoch, next index, micro-batches) for `steps` steps from the data position (epoch,
    index): each step's grad_accum micro-batches collated, counted and on the device (the whole step
    first: the loss is normalised by the trained tokens of all of it), and the position after them,
    which the step's checkpoint saves. run_training reads it through data.Prefetcher, on a thread of
    its own ahead of the steps, so the device never waits on collation; it draws no random numbers."""
    stream = micro_batch_stream(ds.lengths, cfg, epoch, index)
    for _ in range(steps):
        batches = []
        for _ in range(cfg.grad_accum):
            epoch, index, idx = next(stream)
            batches.append(ds.batch(idx))
        yield epoch, index, batches


def step_batch(batch: dict, device) -> dict:
    """The batch on `device`, with what the step reads of it counted first, on the CPU (counted on
    a GPU, each would make the host wait): n_trained and n_tokens; n_loss, what the loss is a mean
    over (the trained tokens, unless the batch brings its own count: DPO's pairs, dpo.count_pairs);
    trained_index, the positions the loss gathers (model.loss.trained_positions); and for packed
    rows the documents' bounds that varlen and per-document attention read (packed_documents).
    Counts a batch brings (ints) pass through as they are.

    On CUDA the tensors are pinned first (page-locked): only from there does a non_blocking copy
    leave the host free at once (from pageable memory CUDA stages it through a pinned buffer of its
    own, with the host waiting). `device` has its index: another thread's "cuda" may be another GPU."""
    counts = {k: v for k, v in batch.items() if isinstance(v, int)}
    batch = {k: v for k, v in batch.items() if k not in counts}
    batch["trained_index"] = trained_positions(batch["labels"])
    if "document_ids" in batch:
        batch["documents"] = packed_documents(batch["document_ids"])
    n_trained = batch["trained_index"].numel()
    counts = {"n_trained": n_trained, "n_tokens": int(batch["attention_mask"].sum()), "n_loss": n_trained, **counts}
    if pins_memory(device):
        batch = {k: pinned(v) for k, v in batch.items()}
    return {**{k: v.to(device, non_blocking=True) for k, v in batch.items()}, **counts}


def pins_memory(device) -> bool:
    """Whether batches for `device` are pinned before their copy: on CUDA (on the CPU there is no
    copy, and pin_memory needs an accelerator)."""
    return torch.device(device).type == "cuda"


def pinned(value):
    """A tensor in page-locked memory; of PackedDocuments, its cu_seqlens (the tensor it holds)."""
    if isinstance(value, PackedDocuments):
        return value._replace(cu_seqlens=value.cu_seqlens.pin_memory())
    return value.pin_memory()
