"""An epoch's micro-batches (lists of example indices) and their padded tensors.

Shuffling is a seeded permutation of the examples per (seed, epoch). Without grouping or packing
the micro-batches are consecutive slices of that permutation, so the order in which examples are
seen does not depend on the micro-batch size: 4 micro-batches of 2 with accumulation see exactly
the examples of 1 micro-batch of 8, which is what lets the tests compare the two.

Packing puts several examples in one row of at most max_seq_len tokens; attention is blocked
between them by `document_ids` (the model keeps each document to itself: varlen attention, an
attention call per document, or a block-diagonal causal mask) and
positions restart at 0 for each example, so a packed row computes the same per-example losses as
the examples one by one. With pack=True a micro-batch is a list of *rows*, each row a list of
example indices:

    pack=False:  [[7, 2, 9], [4, 0, 5], ...]              micro-batch = examples, one row each
    pack=True:   [[[7, 2], [9, 4, 0]], [[5, 1]], ...]     micro-batch = rows of examples

`Prefetcher` runs an iterator on a background thread, a few items ahead: train.py collates the
next steps' micro-batches with it while the current step runs.
"""

import bisect
import queue
import random
import threading

import torch

from .masking import IGNORE_INDEX

GROUP_WINDOW = 64  # group_by_length sorts windows of this many micro-batches


def permutation(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"shuffle-{seed}-{epoch}").shuffle(order)
    return order


def micro_batches(lengths: list[int], micro_batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = False, pack: bool = False, max_seq_len: int | None = None):
    """The epoch's micro-batches as lists of example indices (lists of rows with pack=True)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    order = permutation(len(lengths), seed, epoch)
    rng = random.Random(f"batches-{seed}-{epoch}")
    if pack:
        if group_by_length:
            raise ValueError("pack and group_by_length are exclusive: packing already removes padding")
        if max_seq_len is None:
            raise ValueError("pack needs max_seq_len, the length of a packed row")
        rows = pack_rows(order, lengths, max_seq_len)
        return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    if not group_by_length:
        return [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    # Sort windows of GROUP_WINDOW micro-batches by length, cut them into micro-batches of similar
    # lengths (little padding), then shuffle the micro-batches so long ones are not all first.
    window = micro_batch_size * GROUP_WINDOW
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: -lengths[i])
        batches += [chunk[i:i + micro_batch_size] for i in range(0, len(chunk), micro_batch_size)]
    rng.shuffle(batches)
    return batches


def pack_rows(order: list[int], lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """Best-fit packing: each example, in shuffled order, goes into the open row with the least
    room that still fits it, else into a new row. Rows keep the order they were opened in."""
    rows, room = [], []  # room: sorted (free tokens, row index) of rows that are not full
    for i in order:
        n = lengths[i]
        if n > max_seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than max_seq_len={max_seq_len}")
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, r = room.pop(k)
        else:
            free, r = max_seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, r))
    return rows


def collate(examples: list, pad_id: int, pack: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest row.

    examples: example dicts (input_ids, labels), one per row; with pack=True, rows, each a list of
    example dicts to concatenate. Returns input_ids, labels, attention_mask (B, T) long, and with
    pack=True position_ids and document_ids (B, T).

    Padding is labelled -100 by position, so any pad id (even EOS) is safe. Right padding needs no
    attention mask in the model: causal attention keeps real tokens from seeing the pads after them.
    """
    rows = examples if pack else [[e] for e in examples]
    T = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    document_ids = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for doc, e in enumerate(row):
            n = len(e["input_ids"])
            input_ids[b, t:t + n] = torch.as_tensor(e["input_ids"])
            labels[b, t:t + n] = torch.as_tensor(e["labels"])
            if doc > 0:
                # This label would be predicted from the previous example's last token: no loss
                # across the boundary (unpacked, nothing predicts an example's first token).
                labels[b, t] = IGNORE_INDEX
            position_ids[b, t:t + n] = torch.arange(n)
            document_ids[b, t:t + n] = doc
            t += n
        attention_mask[b, :t] = 1
        # Padding is its own document: a pad position then attends to other pads, never to a
        # real token, and never has an all-masked attention row (which would give NaN).
        position_ids[b, t:] = torch.arange(T - t)
        document_ids[b, t:] = len(row)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if pack:
        batch.update(position_ids=position_ids, document_ids=document_ids)
    return batch


def make_batch(examples: list[dict], micro_batch: list, pad_id: int, pack: bool = False):
    """collate() the examples a micro-batch of `micro_batches` names by index."""
    if pack:
        return collate([[examples[i] for i in row] for row in micro_batch], pad_id, pack=True)
    return collate([examples[i] for i in micro_batch], pad_id)


class Prefetcher:
    """An iterator's items produced on a background thread, up to `depth` ahead of the reader, so
    that making the next items (collating, counting and copying a step's micro-batches) overlaps
    the work on this one. Read it as the iterator itself:

        with Prefetcher(step_batches(...)) as steps:
            batches = next(steps)      # made while the previous step ran

    An exception raised making an item is raised again where that item is read; leaving the
    `with` block (or close()) stops the thread, also mid-run, on an error or a signal."""

    _END = object()  # the iterator is exhausted

    def __init__(self, items, depth: int = 2):
        self.ready = queue.Queue(maxsize=depth)  # (item, None) or (None, exception)
        self.closed, self.ended = threading.Event(), False
        self.thread = threading.Thread(target=self._produce, args=(iter(items),), name="prefetch", daemon=True)
        self.thread.start()

    def _produce(self, items):
        try:
            for item in items:
                if not self._put((item, None)):
                    return  # closed: the reader is gone
            self._put((self._END, None))
        except BaseException as e:  # any error goes to the reader, who raises it
            self._put((None, e))

    def _put(self, entry) -> bool:
        """Queue an entry, waiting while the queue is full; False once the reader has closed."""
        while not self.closed.is_set():
            try:
                self.ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if self.ended:
            raise StopIteration
        item, error = self.ready.get()
        self.ended = error is not None or item is self._END  # the thread made its last entry
        if error is not None:
            raise error
        if item is self._END:
            raise StopIteration
        return item

    def close(self):
        """Stop the thread: it finishes the item it is making, then ends."""
        self.closed.set()
        self.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
