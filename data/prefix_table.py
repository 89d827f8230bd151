"""The prefix table of prefix-token prediction (modded-nanogpt #337): for each GPT-2 token, the
token whose bytes are the longest proper prefix of its bytes, or -1.

" the" has " th" as its longest prefix token, " th" has " t", " t" has " ". Predicting the
prefix of the next token as an extra target gives early training a second, easier signal
about what comes next. Single bytes and the special tokens have no prefix.
"""

import numpy as np


def build_prefix_table(vocab_size: int) -> np.ndarray:
    """int64 (vocab_size,): each id's longest proper prefix token, -1 where there is none (also
    for ids past the tokenizer's, the padding of a padded vocabulary)."""
    import tiktoken

    ranks = tiktoken.get_encoding("gpt2")._mergeable_ranks  # token bytes -> id
    table = np.full(vocab_size, -1, dtype=np.int64)
    for token, token_id in ranks.items():
        if token_id >= vocab_size:
            continue
        for end in range(len(token) - 1, 0, -1):
            prefix = ranks.get(token[:end])
            if prefix is not None:
                table[token_id] = prefix
                break
    return table
