"""Ring-A-Bell (Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models?", ICLR
2024): a model-agnostic, text-encoder-only attack.

1. Concept extraction: the concept vector is the mean, over paired prompts with and without the concept, of the
   difference of their text-encoder outputs (the whole 77 x d last hidden state).
2. Prompt discovery: for each prompt, the target is its own text-encoder output plus eta times the vector; a genetic
   algorithm searches K discrete tokens, [SOT, K tokens, EOS, pads], whose text-encoder output is closest (summed
   squared error) to the target. The K tokens, decoded, are the adversarial prompt. Neither step looks at the UNet,
   so the search of a prompt is done once and reused for every erased model attacked with the same instance.

Official code: chiayi-hsu/Ring-A-Bell at commit e4585ada0a5eb185fbef89bb94147c97f8d2f79a (2025-01-16), cited below
as ``CV`` (Get_Concept_Vector.ipynb) and ``IP`` (InversePrompt.ipynb) with the notebook cell (0-based, markdown
cells counted) and the line inside it, e.g. ``IP c2:1`` = InversePrompt.ipynb, cell 2, line 1. Its prompt files
are data/Prompts_For_ConceptVector/{Nudity_prompt,NoNudity_prompt,Violence_30}.csv, copied unchanged to
data/prompts/attack/ringabell_*.csv. This file is our own code; differences from the official code are marked
"Deviation".
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from erasure.errors import UserError
from erasure.generation import Sampler, generate

from . import AttackResult, register_attack

OFFICIAL = "chiayi-hsu/Ring-A-Bell@e4585ada0a5eb185fbef89bb94147c97f8d2f79a"

# The per-image indices dropped from the nudity vector (CV c7:1-3): each nudity prompt was rendered 5 times by SD v1.4
# (num_samples = 5, CV c5:4) and the images NudeNet found clean were left out; index 5 * prompt + sample. They belong
# to SD v1.4 and the official nudity CSV (50 pairs): pass drop=NUDITY_DROP to reproduce the official nudity vector.
NUDITY_DROP = (134, 15, 16, 147, 151, 35, 38, 174, 55, 62, 202, 204, 91, 93, 95, 96, 98, 106, 109)


@dataclasses.dataclass
class Config:
    """Ring-A-Bell's settings; every default is the official one (InversePrompt.ipynb cell 2)."""

    # eta, the concept vector's weight in the target: `cof = 3` (IP c2:6), used by both the nudity (IP c12:5) and
    # the violence (IP c14:7) searches. The released violence prompts were made with eta 5.5 (K 38) and 5 (K 77)
    # (data/InvPrompt/Violence/Violence_eta_5.5_K_38.csv, Violence_eta_5_K_77.csv).
    eta: float = 3.0
    population: int = 200  # population_size = 200 (IP c2:1); the best population // 2 survive (IP c12:11)
    generations: int = 3000  # generation = 3000 (IP c2:2)
    mutation: float = 0.25  # mutateRate = 0.25 (IP c2:3): per member, one position gets a random id (IP c9:19-25)
    crossover: float = 0.5  # crossoverRate = 0.5 (IP c2:4): per survivor, one-point crossover (IP c9:7-17)
    # K, the number of searched tokens: length = 16 (IP c2:5; "for K = 77, please set length = 75", i.e. every
    # position between SOT and the final EOS).
    length: int = 16
    # The concept-vector prompts, paired (with_concept[i] <-> without_concept[i]) as the official CSV rows are (CV c2,
    # c5). Exactly one source: these lists, the two CSVs, or a saved vector.
    with_concept: list[str] = dataclasses.field(default_factory=list)
    without_concept: list[str] = dataclasses.field(default_factory=list)
    # The official CSVs (data/prompts/attack/ringabell_{Nudity,NoNudity}_prompt.csv, or ringabell_Violence_30.csv for
    # both sides); :func:`read_concept_csv` builds the prompt strings as CV c5:7-14 and c2:7-8, c2:15-16, c5:22-23 do.
    csv_with: str | None = None
    csv_without: str | None = None
    vector: str | None = None  # a saved vector (.npy, 77 x d; official: "Concept Vectors/<Concept>_vector.npy")
    samples: int = 5  # copies of each pair's difference before `drop` (num_samples = 5, CV c2:4, c5:4)
    drop: list[int] = dataclasses.field(default_factory=list)  # indices 5 * pair + sample to drop (CV c7; NUDITY_DROP)
    # Sequences per text-encoder forward pass (None: the whole population in one pass, as fitness(), IP c9:1-5).
    batch_size: int | None = None
    # Deviation (cost only): the official code re-encodes the whole population every generation (IP c12:9), half of
    # it the unchanged survivors; with reuse_fitness a sequence already scored in the previous generation (or twice in
    # this one) keeps its score instead (same numbers up to float rounding in a different batch).
    reuse_fitness: bool = True
    # Deviation: the official code seeds nothing (python `random`, numpy's and torch's global RNGs, IP c9, c12:7); we
    # draw everything from one numpy Generator seeded with (seed, sha256 of the prompt).
    seed: int = 0
    # A folder where each search is also kept on disk (JSON per text encoder, prompt and search settings), so that
    # other processes and later runs reuse it: the search depends on the text encoder only, never on the erased UNet.
    cache_dir: str | None = None

    def __post_init__(self):
        for key in ("population", "generations", "length", "samples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise UserError(f"ringabell.{key} must be a positive integer, got {value!r}")
        if self.population < 2:
            raise UserError(f"ringabell.population must be at least 2 (half of it survives), got {self.population}")
        if not isinstance(self.eta, (int, float)) or isinstance(self.eta, bool) or not math.isfinite(self.eta) \
                or self.eta < 0:
            raise UserError(f"ringabell.eta must be a finite number >= 0, got {self.eta!r}")
        for key in ("mutation", "crossover"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise UserError(f"ringabell.{key} must be a probability in [0, 1], got {value!r}")
        if self.length > 75:
            raise UserError(f"ringabell.length must be at most 75 (77 positions less SOT and EOS), got {self.length}")
        if self.batch_size is not None and (not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1):
            raise UserError(f"ringabell.batch_size must be a positive integer or None, got {self.batch_size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise UserError(f"ringabell.seed must be a non-negative integer, got {self.seed!r}")
        self.with_concept, self.without_concept = list(self.with_concept), list(self.without_concept)
        self.drop = [int(i) for i in self.drop]
        if len(self.with_concept) != len(self.without_concept):
            raise UserError(f"ringabell.with_concept and without_concept must be paired (same length), got "
                            f"{len(self.with_concept)} and {len(self.without_concept)} prompts")
        if (self.csv_with is None) != (self.csv_without is None):
            raise UserError("ringabell.csv_with and csv_without go together: give both CSV paths or neither")
        sources = [bool(self.with_concept), self.csv_with is not None, self.vector is not None]
        if sum(sources) > 1:
            raise UserError("ringabell takes one concept-vector source: with_concept/without_concept prompts, "
                            "csv_with/csv_without, or vector, not several")
        if any(i < 0 for i in self.drop):
            raise UserError(f"ringabell.drop holds indices 5 * pair + sample, which are >= 0, got {self.drop}")


def official_nudity_prompt(row: dict) -> str:
    """One nudity prompt from a row of the official nudity CSV, as CV c5:8-14 builds it (the `clothes` column only
    chooses the branch; a missing person is left out only when clothes are named)."""
    if row["clothes"] != "None" and row["people"] == "None":
        return f"{row['nudity']}, {row['location']}"
    return f"{row['nudity']} {row['people']}, {row['location']}"


def read_concept_csv(path: str | Path, side: str) -> list[str]:
    """The prompts of one side (``"with"`` or ``"without"`` the concept) of an official concept-vector CSV.

    With: the nudity file's columns nudity, people, clothes, location (:func:`official_nudity_prompt`, CV c5:7-14),
    else the column ``prompt`` (violence, CV c2:7-8). Without: the column ``prompt1`` where there is one (the violence
    file holds both sides, CV c2:15-16), else ``prompt`` (NoNudity_prompt.csv, CV c5:22-23). Deviation: read with the
    csv module, so the literal "None" stays a string as the notebook's comparisons expect (pandas >= 2 reads it as
    NaN, which would put "nan" into the prompts); the official cell also opens 'nudity_prompt.csv' and
    '../data/...NoNudity_prompt.csv', paths that do not match its own repository's layout.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ringabell: the concept-vector CSV '{path}' does not exist")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    if side == "with" and {"nudity", "people", "clothes", "location"} <= columns:
        return [official_nudity_prompt(r) for r in rows]
    column = "prompt1" if side == "without" and "prompt1" in columns else "prompt"
    if column not in columns:
        raise UserError(f"ringabell: '{path}' has no '{column}' column (nor nudity/people/clothes/location)")
    return [r[column] for r in rows]


@torch.no_grad()
def encode_ids(models, ids: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Text-encoder last hidden states (float32, N x 77 x d) of id sequences (N x 77), ``batch_size`` at a time
    (``text_encoder(ids)[0]``, no attention mask, as IP c9:3 and as :meth:`Models.encode_text`)."""
    ids = ids.to(models.device)
    step = len(ids) if batch_size is None else int(batch_size)
    return torch.cat([models.text_encoder(ids[i:i + step])[0].float() for i in range(0, len(ids), max(step, 1))])


@torch.no_grad()
def concept_vector(models, with_prompts: Sequence[str], without_prompts: Sequence[str], *, samples: int = 1,
                   drop: Sequence[int] = (), batch_size: int = 64) -> torch.Tensor:
    """The concept vector (77 x d, float32): mean over pairs i of enc(with_i) - enc(without_i), each the full
    last hidden state (``text_encoder(ids)[0]``, CV c5:15-16 and c5:24-25; ``np.mean(... , axis=0)``, CV c7:4).

    The official code encodes every prompt ``samples`` times (identical rows, CV c5:4 and c5:15) and deletes the rows
    listed in ``drop`` (CV c7:1-3) before the mean: each pair then weighs the number of its kept copies. We encode
    each prompt once and weigh its difference so (the same mean)."""
    if len(with_prompts) != len(without_prompts):
        raise UserError(f"ringabell: the concept prompts must be paired, got {len(with_prompts)} with the concept "
                        f"and {len(without_prompts)} without")
    n = len(with_prompts)
    if n == 0:
        raise UserError("ringabell needs concept-vector prompts: set with_concept/without_concept, "
                        "csv_with/csv_without, or vector")
    weights = torch.full((n,), float(samples), dtype=torch.float64)
    for i in set(int(j) for j in drop):
        if not 0 <= i < n * samples:
            raise UserError(f"ringabell.drop index {i} is outside the {n} pairs x {samples} samples")
        weights[i // samples] -= 1
    if float(weights.sum()) <= 0:
        raise UserError("ringabell.drop removes every pair: nothing is left to average")
    total = None
    for start in range(0, n, batch_size):
        diff = (models.encode_text(list(with_prompts[start:start + batch_size]))
                - models.encode_text(list(without_prompts[start:start + batch_size]))).double()
        part = torch.einsum("n,nld->ld", weights[start:start + batch_size].to(diff.device), diff)
        total = part if total is None else total + part
    return (total / weights.sum()).float()


def fitness(embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-candidate score, lower is better: the squared error summed over positions and features,
    ``((target - emb) ** 2).sum(dim=(1, 2))`` (IP c9:4). ``embeddings``: P x L x d; ``target``: L x d or 1 x L x d."""
    return ((target.reshape(1, *embeddings.shape[1:]) - embeddings) ** 2).sum(dim=(1, 2))


def allowed_token_ids(tokenizer, vocab_size: int) -> np.ndarray:
    """The ids the search may draw: 1 .. vocab - 1 without the special tokens. The official code draws
    ``randint(1, 49406)`` (IP c9:23, c12:7): id 0 ("!") and 49406 / 49407 (SOT / EOT) excluded ("Avoid selecting
    Token Ids 0, 40496 [sic], and 40497 [sic]", IP c9:23); on CLIP's vocabulary this gives the same 49,405 ids."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id,
               *getattr(tokenizer, "all_special_ids", [])}
    ids = np.arange(1, vocab_size, dtype=np.int64)
    return ids[~np.isin(ids, np.array([i for i in special if i is not None], dtype=np.int64))]


def full_sequences(tokens: np.ndarray, bos: int, eos: int, pad: int, max_length: int = 77) -> np.ndarray:
    """[SOT, K tokens, EOT, pads] (P x max_length) for P x K tokens (IP c12:7: [49406, K ids, 49407 x (76 - K)]).
    Deviation (none on SD v1.4, whose pad is its EOT): positions after the first EOT hold the tokenizer's pad id, as
    the tokenizer pads the decoded prompt at generation."""
    p, k = tokens.shape
    out = np.full((p, max_length), pad, dtype=np.int64)
    out[:, 0], out[:, 1:k + 1], out[:, k + 1] = bos, tokens, eos
    return out


def crossover(parents: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """IP c9:7-17: every parent is kept; with probability ``rate`` it is crossed with a random parent (possibly
    itself) at a point c drawn from 1 .. K of the 77-id sequence (SOT at 0), which adds the two children
    a[:c] + b[c:] and b[:c] + a[c:], right after the parent. Here ``parents`` hold the K tokens only (P x K), so
    the cut is at column c - 1. (Partner and point are drawn for every parent and used where crossing happens;
    the official code draws them only then: the same distribution.)"""
    n, k = parents.shape
    cross = rng.random(n) < rate
    partner = rng.integers(0, n, size=n)
    cut = rng.integers(1, k + 1, size=n) - 1  # IP c9:13: randint(1, length + 1), a position in the 77-id sequence
    head = np.arange(k)[None, :] < cut[:, None]
    first = np.where(head, parents, parents[partner])
    second = np.where(head, parents[partner], parents)
    keep = np.stack([np.ones(n, bool), cross, cross], axis=1)
    return np.stack([parents, first, second], axis=1)[keep]  # parent i, then its children, as IP c9:10-15 appends


def mutate(population: np.ndarray, rate: float, allowed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """IP c9:19-25: with probability ``rate`` a member gets one random position (1 .. K of the sequence,
    ``randint(1, length + 1)``) set to a random allowed id (``randint(1, 49406)``). In place, like the official
    code, which mutates the surviving parents too: the best sequence is not protected (no elitism)."""
    m, k = population.shape
    hit = rng.random(m) < rate
    pos = rng.integers(0, k, size=m)
    value = allowed[rng.integers(0, len(allowed), size=m)]
    population[hit, pos[hit]] = value[hit]
    return population


@dataclasses.dataclass
class GAResult:
    tokens: np.ndarray  # the K ids of the final best sequence
    fitness: float  # its score
    losses: list[float]  # the best score of each generation's population
    encoded: int  # sequences passed through the text encoder
    scored: int  # population members scored (the official code's text-encoder passes: it encodes them all)


def genetic_search(score_sequences: Callable[[np.ndarray], np.ndarray], allowed: np.ndarray, cfg: Config,
                   rng: np.random.Generator) -> GAResult:
    """The genetic algorithm of IP c12:7-18 on K-token candidates. ``score_sequences`` maps candidates (N x K int64,
    distinct rows) to N scores (lower is better), in one or a few batched text-encoder passes.

    Each generation (IP c12:8-14): score the population, sort ascending (np.argsort), keep the best
    population // 2; unless this is the last generation, crossover then mutation give the next population (about
    `population` members again). The result is the best of the last generation (``population[0]``, IP c12:21); as
    the survivors are mutated too, the best score of a generation can be worse than the previous one's.
    Deviation: a stable sort (ties keep their order; the official np.argsort is quicksort)."""
    k, half = int(cfg.length), int(cfg.population) // 2
    population = allowed[rng.integers(0, len(allowed), size=(int(cfg.population), k))]  # IP c12:7
    known: dict[bytes, float] = {}
    losses: list[float] = []
    encoded = scored = 0
    for step in range(int(cfg.generations)):
        unique, inverse = np.unique(population, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        if cfg.reuse_fitness:
            scores_u = np.array([known.get(row.tobytes(), np.nan) for row in unique], dtype=np.float64)
            todo = np.flatnonzero(np.isnan(scores_u))
        else:  # score every member, duplicates included, as the official code does
            unique, inverse = population, np.arange(len(population))
            scores_u, todo = np.full(len(population), np.nan), np.arange(len(population))
        if len(todo):
            scores_u[todo] = score_sequences(unique[todo])
        encoded += len(todo)
        scored += len(population)
        scores = scores_u[inverse]
        order = np.argsort(scores, kind="stable")[:half]  # IP c12:10-11
        population, scores = population[order], scores[order]
        losses.append(float(scores[0]))  # "minium loss: score[idx[0]]", IP c12:17
        if step == int(cfg.generations) - 1:  # IP c12:12
            break
        known = {row.tobytes(): float(s) for row, s in zip(population, scores)} if cfg.reuse_fitness else {}
        population = mutate(crossover(population, cfg.crossover, rng), cfg.mutation, allowed, rng)  # IP c12:13-14
    return GAResult(tokens=population[0].copy(), fitness=float(scores[0]), losses=losses, encoded=encoded,
                    scored=scored)


@dataclasses.dataclass
class SearchResult:
    """What :meth:`RingABell.search` found for one prompt."""

    prompt: str
    token_ids: list[int]  # the K found ids
    input_ids: list[int]  # the searched 77-id sequence [SOT, K ids, EOT, pads]
    text: str  # the adversarial prompt: the K ids decoded, alone (IP c12:21)
    fitness: float  # the best sequence's score (summed squared error to the target)
    losses: list[float]  # the best score of each generation
    text_evals: int  # sequences through the text encoder: the target, the GA's, and the decoded text's check
    scored: int  # GA population members scored (what the official code encodes)
    seconds: float
    text_input_ids: list[int]  # the decoded text tokenized again: what the text encoder sees at generation
    text_fitness: float  # the score of text_input_ids (differs from `fitness` when decoding does not round-trip)


def encoder_key(models) -> str:
    """A content key of the text encoder (its token-embedding table and parameter count), so that the memoised
    searches of an attack instance are found again in another process (the experiment's workers get the instance
    the base model's attack filled) and never confused between two encoders."""
    table = models.text_encoder.get_input_embeddings().weight.detach().float().cpu().numpy()
    n = sum(p.numel() for p in models.text_encoder.parameters())
    return f"{hashlib.sha256(table.tobytes()).hexdigest()[:16]}-{n}"


@register_attack("ringabell")
class RingABell:
    """The attack over a prompt set: ``RingABell(Config(csv_with=..., csv_without=...))(models, prompts, seeds,
    sampler, ...)``. The searches (text encoder only) are memoised per prompt in the instance, so attacking many
    erased models of one base model with one instance searches each prompt once."""

    Config = Config

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or Config()
        self._vectors: dict[int, torch.Tensor] = {}
        self._searches: dict[tuple[int, str], SearchResult] = {}
        self._pending_vector_evals = 0

    def vector(self, models) -> torch.Tensor:
        """The concept vector (77 x d) from the config's source, computed once per text encoder."""
        key = encoder_key(models)
        if key not in self._vectors:
            cfg = self.cfg
            if cfg.vector is not None:
                path = Path(cfg.vector)
                if not path.is_file():
                    raise UserError(f"ringabell.vector: '{path}' does not exist")
                saved = np.load(path)
                vec = torch.from_numpy(saved).float().reshape(-1, saved.shape[-1])  # the official files: 77 x 768
            else:
                if cfg.csv_with is not None:
                    with_p = read_concept_csv(cfg.csv_with, "with")
                    without_p = read_concept_csv(cfg.csv_without, "without")
                else:
                    with_p, without_p = cfg.with_concept, cfg.without_concept
                vec = concept_vector(models, with_p, without_p, samples=cfg.samples, drop=cfg.drop)
                self._pending_vector_evals += len(with_p) + len(without_p)
            expected = (models.tokenizer.model_max_length, models.text_encoder.config.hidden_size)
            if tuple(vec.shape) != expected:
                raise UserError(f"ringabell: the concept vector has shape {tuple(vec.shape)}, the text encoder's "
                                f"output is {expected}")
            self._vectors[key] = vec.to(models.device)
        return self._vectors[key]

    def _rng(self, prompt: str) -> np.random.Generator:
        digest = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")
        return np.random.default_rng([int(self.cfg.seed), digest])

    def search(self, models, prompt: str) -> SearchResult:
        """Ring-A-Bell's prompt discovery for ``prompt`` (memoised per text encoder and prompt)."""
        key = (encoder_key(models), prompt)
        if key in self._searches:
            return self._searches[key]
        disk = self._disk_path(key)
        if disk is not None and disk.is_file():
            self._searches[key] = SearchResult(**json.loads(disk.read_text()))
            return self._searches[key]
        cfg, tok = self.cfg, models.tokenizer
        start = time.perf_counter()
        max_length = int(tok.model_max_length)
        if cfg.length > max_length - 2:
            raise UserError(f"ringabell.length must be at most {max_length - 2} for this tokenizer, got {cfg.length}")
        # The target: the prompt's own output (tokenized to max length with truncation) + eta x vector (IP c12:4-6)
        target = models.encode_text([prompt])[0] + float(cfg.eta) * self.vector(models)
        vocab = min(len(tok), int(models.text_encoder.get_input_embeddings().weight.shape[0]))
        allowed = allowed_token_ids(tok, vocab)
        bos, eos = int(tok.bos_token_id), int(tok.eos_token_id)
        pad = int(tok.pad_token_id if tok.pad_token_id is not None else eos)

        def score(tokens: np.ndarray) -> np.ndarray:
            ids = torch.from_numpy(full_sequences(tokens, bos, eos, pad, max_length))
            return fitness(encode_ids(models, ids, cfg.batch_size), target).double().cpu().numpy()

        ga = genetic_search(score, allowed, cfg, self._rng(prompt))
        token_ids = [int(i) for i in ga.tokens]
        text = tok.decode(token_ids)  # the K tokens alone, decoded (IP c12:21)
        text_ids = tok([text], padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt").input_ids
        text_fit = float(fitness(encode_ids(models, text_ids), target)[0])
        found = SearchResult(prompt=prompt, token_ids=token_ids,
                             input_ids=full_sequences(ga.tokens[None], bos, eos, pad, max_length)[0].tolist(),
                             text=text, fitness=ga.fitness, losses=ga.losses, text_evals=1 + ga.encoded + 1,
                             scored=ga.scored, seconds=time.perf_counter() - start,
                             text_input_ids=text_ids[0].tolist(), text_fitness=text_fit)
        self._searches[key] = found
        if disk is not None:
            from erasure.io import write_text_atomic

            write_text_atomic(disk, json.dumps(dataclasses.asdict(found)) + "\n")
        return found

    def _disk_path(self, key: tuple[str, str]) -> Path | None:
        """The search's file in ``cache_dir``: named by the encoder, the prompt and every setting the search reads."""
        if not self.cfg.cache_dir:
            return None
        from eval.prompts import resolve_path

        settings = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "cache_dir"}
        name = hashlib.sha256(json.dumps([key, settings], sort_keys=True, default=str).encode()).hexdigest()[:20]
        return resolve_path(self.cfg.cache_dir) / "ringabell" / f"{name}.json"

    def __call__(self, models, prompts: Sequence[str], seeds: Sequence[int], sampler: Sampler, *,
                 detector: Callable[[np.ndarray], np.ndarray] | None = None, guidance: float | None = None,
                 params: dict[str, torch.Tensor] | None = None) -> list[AttackResult]:
        """Attack each (prompt, seed): search the prompt (or reuse its search), generate the adversarial prompt's
        image with ``params`` (the erased model's delta) swapped into the UNet, and ask ``detector``. Ring-A-Bell
        attacks every prompt (no check of the prompt alone first: the official code searches offline)."""
        return [self.attack_one(models, p, int(s), sampler, detector=detector, guidance=guidance, params=params)
                for p, s in zip(prompts, seeds, strict=True)]

    def attack_one(self, models, prompt: str, seed: int, sampler: Sampler, *, detector=None,
                   guidance: float | None = None, params=None) -> AttackResult:
        cached = (encoder_key(models), prompt) in self._searches
        found = self.search(models, prompt)
        vector_evals, self._pending_vector_evals = self._pending_vector_evals, 0
        start = time.perf_counter()
        image = generate(models, [found.text], sampler, seeds=[seed], guidance=guidance, params=params)
        flagged = None if detector is None else bool(np.asarray(detector(image))[0])
        return AttackResult(
            prompt=prompt, seed=seed, text=found.text, token_ids=list(found.token_ids),
            input_ids=list(found.input_ids), image=image[0], flagged=flagged, attacked=True,
            # the search's cost is counted for every model attacked: it is what attacking this model costs, even
            # where the search was made once for several models (extra["cached"])
            losses=list(found.losses), seconds=time.perf_counter() - start + found.seconds,
            unet_evals=2 * int(sampler.steps), text_evals=found.text_evals,
            extra={"fitness": found.fitness, "cached": cached, "search_text_evals": found.text_evals,
                   "search_seconds": found.seconds, "scored": found.scored, "concept_text_evals": vector_evals,
                   "text_input_ids": list(found.text_input_ids), "text_fitness": found.text_fitness,
                   "roundtrip": list(found.text_input_ids) == list(found.input_ids)})
