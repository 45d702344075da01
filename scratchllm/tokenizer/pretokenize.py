"""Pre-tokenization: split text into chunks with a regex before BPE, and count the chunks.

BPE merges never cross a chunk boundary, so words, numbers, punctuation and whitespace are
learned separately (no token spans "dog." or "the cat").
"""

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache

import regex

# GPT-2's pattern (OpenAI, 2019): contractions, letters, numbers of any length, punctuation.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-4's pattern (tiktoken's cl100k_base): case-insensitive contractions, numbers split into
# groups of at most 3 digits, newlines kept apart from other whitespace.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
# GPT-4's is the default: 3-digit number groups give a model consistent arithmetic tokens, and
# newline runs stay separate from indentation, which compresses code and verse better.
DEFAULT_PATTERN = "gpt4"

# Texts above this size are cut into pieces counted on several processes.
PARALLEL_MIN_CHARS = 2_000_000
PIECE_CHARS = 1_000_000
# Places where both built-in patterns always end a chunk, best first: a line break between a
# non-space and a letter ("x\n|W"), then a single space between two letters ("a| b": " b"
# stays one chunk). Cutting a text there gives exactly the chunks of the whole text.
_SAFE_CUTS = (regex.compile(r"(?<=\S\r?\n)(?=\p{L})"), regex.compile(r"(?<=\p{L})(?= \p{L})"))


def safe_cut(text: str, start: int, end: int) -> int | None:
    """The first safe cut position in text[start:end] (see _SAFE_CUTS), or None."""
    # The common case without the regex engine: str.find is much faster than a lookbehind
    # search, and isalpha() is the patterns' \p{L}.
    newline = text.find("\n", max(start - 1, 1), end - 1)
    while newline != -1:
        before = text[newline - 1]
        if before == "\r" and newline >= 2:
            before = text[newline - 2]
        if not before.isspace() and text[newline + 1].isalpha():
            return newline + 1
        newline = text.find("\n", newline + 1, end - 1)
    for pattern in _SAFE_CUTS:
        match = pattern.search(text, start, end)
        if match:
            return match.start()
    return None


def resolve_pattern(pattern: str) -> str:
    """Return the regex for a pattern name ('gpt2', 'gpt4') or the pattern itself."""
    return PATTERNS.get(pattern, pattern)


@lru_cache(maxsize=8)
def compile_pattern(pattern: str) -> regex.Pattern:
    """Compile (and cache) a pre-tokenization regex."""
    return regex.compile(resolve_pattern(pattern))


def split_chunks(text: str, pattern: str = DEFAULT_PATTERN) -> list[str]:
    """Split text into pre-tokenization chunks; joining them gives the text back."""
    return compile_pattern(pattern).findall(text)


def _count_job(args: tuple[list[str], str]) -> Counter:
    texts, pattern = args
    compiled = compile_pattern(pattern)
    counts: Counter = Counter()
    for text in texts:
        counts.update(compiled.findall(text))
    return counts


def _pieces(text: str, size: int) -> Iterator[str]:
    """Cut text into pieces of about `size` chars at safe boundaries (see safe_cut)."""
    start = 0
    while len(text) - start > size:
        cut = safe_cut(text, start + size, len(text))
        if cut is None:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def count_chunks(
    texts: Iterable[str],
    pattern: str = DEFAULT_PATTERN,
    workers: int | None = None,
    progress: bool = False,
) -> Counter:
    """Count every distinct chunk of every text (each text is split independently)."""
    pattern = resolve_pattern(pattern)
    cuttable = pattern in PATTERNS.values()
    # Jobs of about PIECE_CHARS characters: a long text cut into pieces, short texts (e.g. a
    # sample of segments) gathered, so that a process gets few, large jobs.
    jobs: list[list[str]] = [[]]
    sizes = [0]
    for text in texts:
        for piece in _pieces(text, PIECE_CHARS) if cuttable else [text]:
            if sizes[-1] >= PIECE_CHARS:
                jobs.append([])
                sizes.append(0)
            jobs[-1].append(piece)
            sizes[-1] += len(piece)
    total = sum(sizes)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    counts: Counter = Counter()
    bar = _progress_bar(total, progress)
    if workers <= 1 or total < PARALLEL_MIN_CHARS or len(jobs) < 2:
        for job, size in zip(jobs, sizes, strict=True):
            counts.update(_count_job((job, pattern)))
            bar.update(size)
    else:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=_mp_context()) as pool:
            results = pool.map(_count_job, [(job, pattern) for job in jobs])
            for size, job_counts in zip(sizes, results, strict=True):
                counts.update(job_counts)
                bar.update(size)
    bar.close()
    return counts


def _mp_context():
    # Linux: fork, so scripts without a __main__ guard (or piped to python) still work; the
    # workers only run the regex, never torch. Elsewhere: spawn, fork being unsafe on macOS.
    import multiprocessing
    import sys

    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return multiprocessing.get_context(method)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="char", unit_scale=True, desc="counting chunks", disable=not enabled
    )
