"""Training data: files to conversations, chat templates, exact label masks, batches.

    load_conversations(path)             .json/.jsonl/.csv records -> [[{"role", "content"}, ...], ...]
    load_tokenizer(model_dir, template)  tokenizer.json + the model's chat template -> ChatTokenizer
    tokenizer_files(model_dir, tok)      the tokenizer files and template saved beside an adapter
    tokenize_file(path, tok, max_seq_len, mask)   -> TokenizedData (cached on disk)
    split_validation(examples, fraction, seed)    -> (train, val)
    micro_batches(lengths, micro_batch_size, seed, epoch, ...)  -> lists of example indices
    collate(examples, pad_id, pack) / make_batch(examples, micro_batch, pad_id, pack) -> tensors
    Prefetcher(items)                    an iterator's items made on a background thread, ahead of use
    tokenize_pairs(path, tok, max_seq_len)        DPO's {"prompt", "chosen", "rejected"} -> PreferenceData
    make_pair_batch(pairs, idx, pad_id)           B pairs -> one (2B, T) batch, chosen rows first
    tokenize_unpaired(path, tok, max_seq_len)     KTO's {"prompt", "completion", "label"} -> UnpairedData
    make_unpaired_batch(examples, idx, pad_id)    B completions -> (B, T) batch + (B, T') KL rows, desirable
    tokenize_prompts(path, tok, max_prompt_len)   GRPO's {"prompt", ...fields} -> PromptData

`python -m data.inspect --model M --data F` shows which tokens are trained.
"""

from .batching import Prefetcher, collate, make_batch, micro_batches, pack_rows
from .dataset import TokenizedData, split_validation, tokenize_file, trained_count
from .formats import TEXT_ROLE, DataError, load_conversations
from .masking import IGNORE_INDEX, MASK_MODES, mask_labels, tokenize_conversations
from .preference import PreferenceData, is_preference_file, make_pair_batch, tokenize_pairs
from .prompts import PromptData, is_prompt_file, load_prompts, tokenize_prompts
from .sample_style import SIGN_OFF, GREETING, shows_style
from .templates import BUILTIN_TEMPLATES
from .tokenizer import ChatTokenizer, load_tokenizer, tokenizer_files
from .unpaired import UnpairedData, is_unpaired_file, make_unpaired_batch, tokenize_unpaired

__all__ = ["BUILTIN_TEMPLATES", "ChatTokenizer", "DataError", "GREETING", "IGNORE_INDEX", "MASK_MODES",
           "PreferenceData", "Prefetcher", "SIGN_OFF", "TEXT_ROLE", "TokenizedData", "collate", "load_conversations", "load_tokenizer",
           "make_batch", "mask_labels", "micro_batches", "pack_rows", "shows_style", "split_validation",
           "tokenize_conversations", "tokenize_file", "trained_count", "is_preference_file", "make_pair_batch",
           "tokenize_pairs", "tokenizer_files", "UnpairedData", "is_unpaired_file", "make_unpaired_batch",
           "tokenize_unpaired", "PromptData", "is_prompt_file", "load_prompts", "tokenize_prompts"]
