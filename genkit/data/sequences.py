"""Token sequences: the synthetic DNA-like set ``motifs`` and a loader for the user's own token file.

Token data are long tensors ``[N, L]`` of ids in ``0..V-1`` (what :class:`genkit.models.MaskedDiffusion`
trains on), never floats: nothing rescales them, and :func:`genkit.train.batching.warn_scale` skips integer data.

``motifs`` (:func:`motifs`), over the alphabet ``ACGT`` (ids ``A=0, C=1, G=2, T=3``, V = 4), length ``L``
(default 32). Each sequence is drawn, independently, as

1. a background of ``L`` tokens i.i.d. uniform over the 4 letters;
2. one motif ``k`` uniform over :data:`MOTIFS` (``TATAAT``, the -10 box, and ``CACGTG``, the E-box; each of
   length ``m = 6``), written over the background at a start ``s`` uniform in ``0..L-m``.

So every sequence holds at least one motif, while a uniform random sequence of length 32 holds one with
probability about 1.3 %: :func:`motif_rate` tells the two apart. The entropy ``H`` of a sequence is bounded in
closed form (:func:`motifs_entropy_bounds`): ``H >= H(X | k, s) = (L - m) log 4`` and ``H <= H(X, k, s) = (L - m)
log 4 + log 2 + log(L - m + 1)`` nats. Any model's expected negative log-likelihood (a cross-entropy), and so
any upper bound on it such as an ELBO, is at least ``H``, hence at least the lower bound.

The draw is seeded by the generator and unlimited (like the toy sets), so :func:`genkit.data.held_out` gives two
fresh held-out draws.

:func:`load_tokens` reads the user's own sequences: a ``.npy`` of integers ``[N, L]`` (ids ``0..V-1``), a
FASTA file (``>name`` headers, sequences over one or several lines, upper-cased), or a text file of one
sequence per line; all of the same length, over an alphabet (given, e.g. ``"ACGT"``, or the sorted set of the
file's letters); blank lines are skipped. Its ``split="train"`` / ``"test"`` hold out a fixed 10 % of the
sequences (:data:`TOKEN_HOLDOUT`), the same whatever the training seed.

>>> x = motifs(4, generator=torch.Generator().manual_seed(0))
>>> x.shape, x.dtype, float(motif_rate(x))
(torch.Size([4, 32]), torch.int64, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError

__all__ = ["DNA", "MOTIFS", "motifs", "motif_rate", "motifs_entropy_bounds", "encode", "decode", "load_tokens",
           "token_file_format", "save_tokens", "TOKEN_ALPHABETS", "FASTA_SUFFIXES", "TOKEN_HOLDOUT",
           "token_frequencies", "TOKEN_SETS", "TOKEN_STATISTICS", "sequence_statistics"]

#: The ``motifs`` alphabet: token id ``i`` is ``DNA[i]``.
DNA = "ACGT"
#: The planted motifs of ``motifs``.
MOTIFS = ("TATAAT", "CACGTG")
#: Named token sets: name -> vocabulary size (their samples are long tensors [N, L]).
TOKEN_SETS: dict[str, int] = {"motifs": len(DNA), "dna": len(DNA)}
#: Each named token set's own statistics of samples ``[N, L]`` (:func:`sequence_statistics`); a set's module
#: adds its entry (:mod:`genkit.data.dna_task` adds ``dna``).
TOKEN_STATISTICS: dict[str, Callable[[Tensor], dict[str, float]]] = {
    "motifs": lambda x: {"motif_rate": motif_rate(x)}}
#: Named token sets' alphabets: token id ``i`` of set ``name`` is ``TOKEN_ALPHABETS[name][i]``.
TOKEN_ALPHABETS: dict[str, str] = {"motifs": DNA, "dna": DNA}
#: File names :func:`load_tokens` reads as FASTA (besides any file whose first line starts with ``>``).
FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".faa", ".fas")
#: The share of a token file :func:`load_tokens` holds out as its test split.
TOKEN_HOLDOUT = 0.1


def encode(text: str, alphabet: str = DNA) -> Tensor:
    """The token ids ``[len(text)]`` of a string over ``alphabet``."""
    index = {c: i for i, c in enumerate(alphabet)}
    bad = sorted(set(text) - set(index))
    if bad:
        raise DataError(f"{text!r} holds characters {bad} outside the alphabet {alphabet!r}")
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def decode(x: Tensor, alphabet: str = DNA) -> list[str]:
    """The strings of token ids ``x [N, L]`` over ``alphabet``."""
    return ["".join(alphabet[int(i)] for i in row) for row in x]


def motifs(n: int, *, generator: torch.Generator | None = None, length: int = 32) -> Tensor:
    """``n`` sequences ``[n, length]`` (long, ids of :data:`DNA`) of the ``motifs`` set (see the module)."""
    m = max(len(s) for s in MOTIFS)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive int (number of sequences), got {n!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < m:
        raise ConfigError(f"length must be an int >= {m} (the motif length), got {length!r}")
    x = torch.randint(0, len(DNA), (n, length), generator=generator)
    k = torch.randint(0, len(MOTIFS), (n,), generator=generator)
    s = torch.randint(0, length - m + 1, (n,), generator=generator)
    table = torch.stack([encode(motif) for motif in MOTIFS])  # [K, m]
    cols = s[:, None] + torch.arange(m)
    x.scatter_(1, cols, table[k])
    return x


def motif_rate(x: Tensor) -> float:
    """The share of sequences ``x [N, L]`` that hold at least one of :data:`MOTIFS` anywhere."""
    if not torch.is_tensor(x) or x.ndim != 2 or x.is_floating_point():
        raise DataError(f"motif_rate needs token ids [N, L]; got {getattr(x, 'shape', type(x).__name__)}")
    x = x.long().cpu()
    found = torch.zeros(x.shape[0], dtype=torch.bool)
    for motif in MOTIFS:
        m = encode(motif)
        if x.shape[1] >= len(m):
            windows = x.unfold(1, len(m), 1)  # [N, L - m + 1, m]
            found |= (windows == m).all(-1).any(-1)
    return float(found.double().mean())


def motifs_entropy_bounds(length: int = 32) -> tuple[float, float]:
    """``(lower, upper)`` bounds in nats on the entropy of one ``motifs`` sequence of ``length`` (the module's
    derivation): ``(L - m) log 4`` and ``(L - m) log 4 + log K + log(L - m + 1)``."""
    m = len(MOTIFS[0])
    low = (length - m) * math.log(len(DNA))
    return low, low + math.log(len(MOTIFS)) + math.log(length - m + 1)


def token_frequencies(x: Tensor, vocab_size: int) -> Tensor:
    """Per-position token frequencies ``[L, V]`` of ``x [N, L]`` (each row sums to 1)."""
    x = x.long().cpu()
    counts = torch.nn.functional.one_hot(x, vocab_size).double().sum(0)
    return counts / x.shape[0]


def sequence_statistics(name: str | None, x: Tensor) -> dict[str, float]:
    """The data set ``name``'s own statistics of token samples ``x`` (:data:`TOKEN_STATISTICS`: ``motif_rate``
    for ``motifs``, mean activity and motif shares for ``dna``; ``{}`` for other sets)."""
    stats = TOKEN_STATISTICS.get(name) if name is not None else None
    return stats(x) if stats is not None else {}


def token_file_format(path: str | Path) -> str:
    """``"npy"``, ``"fasta"`` or ``"text"``: how :func:`load_tokens` reads ``path`` (FASTA: a ``.fa``, ``.fasta``,
    ``.fna``, ``.faa`` or ``.fas`` name, or a file whose first line (blank and ``;`` comment lines skipped) starts
    with ``>``)."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return "npy"
    if suffix in FASTA_SUFFIXES:
        return "fasta"
    try:
        with path.open("rb") as f:
            head = f.read(65536)
    except OSError:
        return "text"
    first = next((line for line in (raw.strip() for raw in head.splitlines()) if line and not line.startswith(b";")),
                 b"")
    return "fasta" if first.startswith(b">") else "text"


def _fasta_records(path: Path, text: str) -> list[tuple[str, str]]:
    """``[(name, sequence)]`` of a FASTA text: a record is a ``>name`` header line and the sequence lines up to
    the next header (joined, whitespace dropped, upper-cased); blank lines and ``;`` comment lines are skipped."""
    records: list[tuple[str, list[str]]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            records.append((line[1:].strip() or f"(unnamed, line {number})", []))
        elif not records:
            raise DataError(f"{path}: line {number} holds sequence letters before the first '>' header; a FASTA "
                            "record starts with a '>name' line (or use a text file of one sequence per line)")
        else:
            records[-1][1].append("".join(line.split()).upper())
    out = [(name, "".join(parts)) for name, parts in records]
    empty = next((i for i, (_, seq) in enumerate(out) if not seq), None)
    if empty is not None:
        raise DataError(f"{path}: FASTA record {empty + 1} ({out[empty][0]!r}) has no sequence; drop its header or "
                        "add its sequence lines")
    return out


def _split(n: int, split: str, holdout: float, path: Path) -> Tensor:
    """Indices (in file order) of ``split`` of ``n`` sequences: a permutation seeded by 0 (not the run's seed, so
    every script holds out the same sequences) whose first ``max(1, round(holdout * n))`` are ``test``."""
    if split == "all":
        return torch.arange(n)
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'all', 'train' or 'test'; got {split!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise ConfigError(f"holdout must be a fraction in (0, 1) (the share of sequences held out, e.g. 0.1); got "
                          f"{holdout!r}")
    k = max(1, round(holdout * n))
    if n - k < 1 or n < 10:
        raise DataError(f"{path} holds {n} sequences; holding out {holdout:g} of them for evaluation needs at least "
                        "10 (add sequences, or train on all of them through genkit.data.load_tokens(split='all'))")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return (perm[:k] if split == "test" else perm[k:]).sort().values


def load_tokens(path: str | Path, alphabet: str | None = None, *, split: str = "all",
                holdout: float = TOKEN_HOLDOUT) -> tuple[Tensor, str | None]:
    """``(tokens [N, L] long, alphabet)`` from a token file (:func:`token_file_format` says which kind):

    - ``.npy``: integer ids ``[N, L]`` (alphabet None; an ``alphabet`` is refused, the ids are already tokens);
    - FASTA: one record per ``>name`` header, its sequence on one or several lines, upper-cased (DNA is
      case-insensitive: soft-masked lower-case bases are the same bases), ``alphabet`` upper-cased too;
    - text: one sequence per line (blank lines skipped), case kept.

    Every sequence must have the same length (a DataError names the first that differs and the fix). The
    alphabet is the given one (token id ``i`` is ``alphabet[i]``, so the vocabulary is ``len(alphabet)``) or
    the sorted set of the file's letters. ``split="train"`` / ``"test"`` keeps the sequences of that split,
    each in file order: the test split is a fixed share ``holdout`` of them (``max(1, round(holdout * N))``,
    chosen by a permutation seeded by 0, whatever the training seed; the rest is train); ``"all"`` keeps all.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"token file {path} does not exist")
    if alphabet is not None:
        if not isinstance(alphabet, str) or not alphabet:
            raise ConfigError(f"alphabet must be a non-empty string of the token letters (e.g. 'ACGT'); got "
                              f"{alphabet!r}")
    kind = token_file_format(path)
    if kind == "npy":
        if alphabet is not None:
            raise ConfigError(f"{path} holds token ids already; an alphabet applies to text files only")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path} as a .npy array ({e})") from None
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or arr.size == 0:
            raise DataError(f"{path} must hold integer token ids [N, L]; got {arr.dtype} of shape {arr.shape}")
        if arr.min() < 0:
            raise DataError(f"{path} holds a negative token id ({arr.min()}); ids are 0..V-1")
        x = torch.from_numpy(arr.astype(np.int64))
        return x[_split(len(x), split, holdout, path)], None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as text ({e})") from None
    if kind == "fasta":
        records = _fasta_records(path, text)
        alphabet = None if alphabet is None else alphabet.upper()
        what, unit = "FASTA record", "letters"
    else:
        records = [(f"line {i + 1}", line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]
        what, unit = "line", "characters"
    if not records:
        raise DataError(f"{path} holds no sequences" + (" (no '>' record)" if kind == "fasta" else " (one per line)"))
    if alphabet is not None and len(set(alphabet)) != len(alphabet):
        raise ConfigError(f"alphabet {alphabet!r} repeats a letter; give each token letter once (id i is "
                          "alphabet[i])")
    lengths = sorted({len(seq) for _, seq in records})
    if len(lengths) > 1:
        first = next(i for i, (_, seq) in enumerate(records) if len(seq) != len(records[0][1]))
        name = records[first][0] if kind == "text" else f"{first + 1} ({records[first][0]!r})"
        first_name = "the first" if kind == "text" else f"the first ({records[0][0]!r})"
        raise DataError(f"{path}: sequences must all have the same length; {what} {name} has "
                        f"{len(records[first][1])} {unit}, {first_name} {len(records[0][1])} (lengths seen: "
                        f"{lengths[:5]}); pad or crop them to one length (e.g. fixed-length windows)")
    letters = "".join(seq for _, seq in records)
    alphabet = alphabet if alphabet is not None else "".join(sorted(set(letters)))
    index = {c: i for i, c in enumerate(alphabet)}
    bad = sorted(set(letters) - set(index))
    if bad:
        first = next(i for i, (_, seq) in enumerate(records) if set(seq) - set(index))
        name = records[first][0] if kind == "text" else f"{first + 1} ({records[first][0]!r})"
        raise DataError(f"{path}: {what} {name} holds {bad} outside the alphabet {alphabet!r}; give an alphabet "
                        "with every letter of the file, or clean those letters out")
    ids = torch.tensor([index[c] for c in letters], dtype=torch.long).view(len(records), lengths[0])
    return ids[_split(len(ids), split, holdout, path)], alphabet


def save_tokens(path: str | Path, x: Tensor, alphabet: str, *, name: str = "sample") -> Path:
    """Write token ids ``x [N, L]`` as sequences over ``alphabet`` (id ``i`` is ``alphabet[i]``) to ``path``:
    FASTA (records ``>{name}_{i}``, one sequence line each) when its suffix is one of :data:`FASTA_SUFFIXES`,
    else text, one sequence per line; :func:`load_tokens` reads either back to ``x``. Returns ``path``."""
    path = Path(path)
    if not torch.is_tensor(x) or x.ndim != 2 or x.is_floating_point() or x.dtype == torch.bool:
        raise DataError(f"save_tokens needs token ids [N, L] (a long tensor); got "
                        f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(alphabet, str) or not alphabet or len(set(alphabet)) != len(alphabet):
        raise ConfigError(f"alphabet must be a string of distinct token letters (e.g. 'ACGT'); got {alphabet!r}")
    x = x.long().cpu()
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= len(alphabet)):
        raise DataError(f"token ids span {int(x.min())}..{int(x.max())} but the alphabet {alphabet!r} has "
                        f"{len(alphabet)} letters (ids 0..{len(alphabet) - 1}); pass the alphabet the model was "
                        "trained with")
    rows = decode(x, alphabet)
    if path.suffix.lower() in FASTA_SUFFIXES:
        text = "".join(f">{name}_{i}\n{row}\n" for i, row in enumerate(rows))
    else:
        text = "".join(f"{row}\n" for row in rows)
    path.write_text(text, encoding="utf-8")
    return path
