"""Byte-level BPE training with incremental pair counts and a lazy max-heap.

minbpe's loop recounts every pair of the whole corpus after each merge. Here the corpus is
first reduced to its distinct chunks with their counts; pair counts are then kept up to date
by touching only the chunks that contain the merged pair (found through an index from each
pair to those chunks), and the most frequent pair comes off a heap whose stale entries are
skipped when popped. Ties go to the smallest (left id, right id), so training is deterministic.
"""

import heapq
from collections import defaultdict
from collections.abc import Mapping
from itertools import pairwise

Pair = tuple[int, int]


def train_bpe(
    chunk_counts: Mapping[str, int], vocab_size: int, progress: bool = False
) -> tuple[list[bytes], list[Pair]]:
    """Learn merges over UTF-8 bytes until the vocabulary has `vocab_size` tokens.

    Returns (vocab, merges): vocab[id] is the token's bytes (ids 0-255 are the raw bytes);
    merges[k] = (left id, right id) is the k-th merge. A merge whose bytes already exist as a
    token (reached by another split) reuses that id, so ids stay unique byte strings.
    """
    vocab = [bytes([b]) for b in range(256)]
    index = {token: i for i, token in enumerate(vocab)}
    merges: list[Pair] = []
    # Distinct chunks in sorted order (determinism does not depend on input order).
    items = sorted(chunk_counts.items())
    words = [list(chunk.encode("utf-8")) for chunk, _ in items]
    freqs = [count for _, count in items]

    pair_counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for w, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] += freq
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    bar = _progress_bar(vocab_size - len(vocab), progress)
    while len(vocab) < vocab_size and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue  # stale entry: the pair's count changed after it was pushed
        a, b = pair
        merged = vocab[a] + vocab[b]
        new_id = index.get(merged)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(merged)
            index[merged] = new_id
            bar.update(1)
        merges.append(pair)
        changed = _apply_merge(pair, new_id, words, freqs, pair_counts, where)
        for p in changed:
            count = pair_counts.get(p, 0)
            if count > 0:
                heapq.heappush(heap, (-count, p))
    bar.close()
    return vocab, merges


def _apply_merge(
    pair: Pair,
    new_id: int,
    words: list[list[int]],
    freqs: list[int],
    pair_counts: dict[Pair, int],
    where: dict[Pair, set[int]],
) -> set[Pair]:
    """Replace `pair` by `new_id` in every word holding it; update counts locally."""
    a, b = pair
    changed: set[Pair] = set()
    for w in sorted(where.pop(pair, ())):
        word, freq = words[w], freqs[w]
        out: list[int] = []
        i, n = 0, len(word)
        while i < n:
            if i + 1 < n and word[i] == a and word[i + 1] == b:
                # (x a b y) -> (x T y): x is the token already written (maybe a fresh T),
                # y is still the unmerged next token.
                if out:
                    x = out[-1]
                    pair_counts[(x, a)] -= freq
                    pair_counts[(x, new_id)] += freq
                    where[(x, new_id)].add(w)
                    changed.add((x, a))
                    changed.add((x, new_id))
                if i + 2 < n:
                    y = word[i + 2]
                    pair_counts[(b, y)] -= freq
                    pair_counts[(new_id, y)] += freq
                    where[(new_id, y)].add(w)
                    changed.add((b, y))
                    changed.add((new_id, y))
                out.append(new_id)
                i += 2
            else:
                out.append(word[i])
                i += 1
        words[w] = out
    pair_counts.pop(pair, None)
    changed.discard(pair)
    return changed


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=max(total, 0), unit="merge", desc="training BPE", disable=not enabled)
