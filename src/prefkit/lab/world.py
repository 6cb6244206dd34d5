"""Synthetic worlds with a known true reward (DESIGN.md §7).

A world is a small language of plain ASCII words. Texts are space-separated words, so any tokenizer
(prefkit's byte tokenizer included) reads them and saved files stay human-readable.

Base distribution
    A prompt is a template around one topic name, e.g. ``"tell me about weather"``. A response is
    1..``max_len`` words (length uniform), each word drawn independently from a prompt-conditioned
    unigram distribution: every response word has weight 1, except the prompt topic's own words
    (weight ``on_topic_weight``) and the other topics' words (weight ``off_topic_weight``).

True reward of user group g for a prompt x and a response y (words ``y_1 .. y_n``, split on spaces)::

    quality_g(x, y) = sum_i u_g[y_i]               (words outside the vocabulary have utility 0)
    relevance(x, y) = #{i : y_i is a word of x's topic}
    length(y)       = n
    r_g(x, y)       = quality_g + b_g * relevance + lambda_g * length

with per-word utilities ``u_g``, topic bonus ``b_g`` and length weight ``lambda_g`` (positive:
longer is better, so length can be rewarded or exploited).

Population (``group=None``): the share-weighted average over groups, ``r(x, y) = sum_g s_g r_g(x, y)``,
i.e. the expected reward of a user drawn at random from the population. Note that the probability
that such a user prefers a to b is ``sum_g s_g sigmoid(logit_g)`` (`World.preference_prob`), which is
not ``sigmoid`` of the averaged logit.

Preferences between two responses a, b to the same prompt have the logit::

    logit_g(x, a, b) = r_g(x, a) - r_g(x, b) + c(a, b)

where ``c`` is antisymmetric and zero except in worlds with a cyclic component:
``c(a, b) = gamma * C[style(a), style(b)]`` with the rock-paper-scissors matrix ``C`` over the
styles formal > casual > poetic > formal (``C[s, t] = 1`` when s beats t, ``-1`` when t beats s,
else 0). ``style(y)`` is the style with the most marker words in y (none on a tie or no marker).
Such a world admits intransitive preferences: three responses can be preferred a > b > c > a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

TOPICS: dict[str, tuple[str, ...]] = {
    "weather": ("sun", "rain", "wind"),
    "music": ("song", "drum", "piano"),
    "sports": ("goal", "ball", "team"),
    "food": ("bread", "soup", "spice"),
    "travel": ("train", "map", "hotel"),
    "science": ("atom", "cell", "star"),
}
PROMPT_TEMPLATES: tuple[str, ...] = (
    "tell me about {topic}",
    "explain {topic} please",
    "describe {topic}",
    "what about {topic}",
)
GOOD_WORDS: tuple[str, ...] = ("clear", "helpful", "precise", "kind")
BAD_WORDS: tuple[str, ...] = ("rude", "vague", "wrong", "boring")
STYLES: dict[str, tuple[str, ...]] = {
    "formal": ("indeed", "furthermore", "therefore"),
    "casual": ("yeah", "cool", "stuff"),
    "poetic": ("softly", "bright", "dream"),
}
FILLER_WORDS: tuple[str, ...] = ("the", "a", "and", "is", "very", "it", "this")
# Rock-paper-scissors: each style beats the next one.
STYLE_BEATS: dict[str, str] = {"formal": "casual", "casual": "poetic", "poetic": "formal"}

RESPONSE_WORDS: tuple[str, ...] = (
    GOOD_WORDS
    + BAD_WORDS
    + tuple(w for words in STYLES.values() for w in words)
    + FILLER_WORDS
    + tuple(w for words in TOPICS.values() for w in words)
)
_RESPONSE_INDEX: dict[str, int] = {w: i for i, w in enumerate(RESPONSE_WORDS)}
_TOPIC_OF_WORD: dict[str, str] = {w: topic for topic, words in TOPICS.items() for w in words}
_STYLE_OF_WORD: dict[str, str] = {w: style for style, words in STYLES.items() for w in words}


@dataclass
class Group:
    """One user group: its share of the population and the parameters of its true reward."""

    name: str
    share: float
    utilities: dict[str, float]
    topic_bonus: float
    length_weight: float


@dataclass
class World:
    """A synthetic world: base distribution over prompts/responses and hidden true rewards.

    Build one with `make_world`. ``groups`` lists the user groups (shares sum to 1);
    ``cyclic_weight`` is gamma of the cyclic term (0: preferences are transitive).
    """

    name: str
    groups: list[Group]
    cyclic_weight: float = 0.0
    max_len: int = 8
    on_topic_weight: float = 5.0
    off_topic_weight: float = 0.3
    _group_index: dict[str, Group] = field(init=False, repr=False)

    def __post_init__(self):
        total = sum(g.share for g in self.groups)
        if not self.groups or abs(total - 1.0) > 1e-9 or any(g.share <= 0 for g in self.groups):
            raise ValueError(f"world {self.name!r}: group shares must be positive and sum to 1, got {total}")
        self._group_index = {g.name: g for g in self.groups}
        if len(self._group_index) != len(self.groups):
            raise ValueError(f"world {self.name!r}: group names must be distinct")

    # ----- vocabulary and base distribution -----
    @property
    def vocabulary(self) -> list[str]:
        """Every word prompts and responses are made of, sorted."""
        prompt_words = {w for t in PROMPT_TEMPLATES for w in t.format(topic="").split()}
        return sorted(prompt_words | set(TOPICS) | set(RESPONSE_WORDS))

    @property
    def shares(self) -> dict[str, float]:
        return {g.name: g.share for g in self.groups}

    @property
    def prompts(self) -> list[str]:
        """Every distinct prompt of the base distribution (each template around each topic)."""
        return [t.format(topic=topic) for topic in TOPICS for t in PROMPT_TEMPLATES]

    def sample_prompts(self, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` prompts: a uniform template around a uniform topic."""
        topics = list(TOPICS)
        out = []
        for _ in range(n):
            template = PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))]
            out.append(template.format(topic=topics[rng.integers(len(topics))]))
        return out

    def word_probs(self, prompt: str) -> np.ndarray:
        """The unigram distribution of response words (order of `RESPONSE_WORDS`) given ``prompt``."""
        topic = prompt_topic(prompt)
        weights = np.ones(len(RESPONSE_WORDS))
        for i, word in enumerate(RESPONSE_WORDS):
            if word in _TOPIC_OF_WORD:
                on_topic = _TOPIC_OF_WORD[word] == topic
                weights[i] = self.on_topic_weight if on_topic else self.off_topic_weight
        return weights / weights.sum()

    def sample_responses(self, prompt: str, n: int, rng: np.random.Generator, max_len: int | None = None) -> list[str]:
        """``n`` responses to ``prompt``: length uniform in 1..max_len, words i.i.d. from `word_probs`."""
        max_len = self.max_len if max_len is None else max_len
        probs = self.word_probs(prompt)
        out = []
        for _ in range(n):
            length = int(rng.integers(1, max_len + 1))
            idx = rng.choice(len(RESPONSE_WORDS), size=length, p=probs)
            out.append(" ".join(RESPONSE_WORDS[i] for i in idx))
        return out

    def base_log_prob(self, prompt: str, response: str) -> float:
        """``log p_base(response | prompt)``: ``-log(max_len)`` for the length plus the words' unigram
        log-probabilities (``-inf`` for a response the base distribution cannot produce)."""
        words = response.split()
        if not 1 <= len(words) <= self.max_len or any(w not in _RESPONSE_INDEX for w in words):
            return float("-inf")
        probs = self.word_probs(prompt)
        return -math.log(self.max_len) + float(sum(math.log(probs[_RESPONSE_INDEX[w]]) for w in words))

    # ----- true reward -----
    def group(self, name: str) -> Group:
        try:
            return self._group_index[name]
        except KeyError:
            raise ValueError(f"world {self.name!r} has no group {name!r}; groups: {', '.join(self.shares)}") from None

    def _weighted(self, group: str | None) -> list[tuple[float, Group]]:
        if group is None:
            return [(g.share, g) for g in self.groups]
        return [(1.0, self.group(group))]

    def attributes(self, prompt: str, response: str, group: str | None = None) -> dict[str, float]:
        """The reward's components: ``quality`` (sum of word utilities; share-weighted for
        ``group=None``), ``relevance`` (number of words of the prompt's topic), ``length`` (words)."""
        words = response.split()
        topic = prompt_topic(prompt)
        quality = sum(w * sum(g.utilities.get(word, 0.0) for word in words) for w, g in self._weighted(group))
        relevance = sum(1 for word in words if topic is not None and _TOPIC_OF_WORD.get(word) == topic)
        return {"quality": float(quality), "relevance": float(relevance), "length": float(len(words))}

    def true_reward(self, prompt: str, response: str, group: str | None = None) -> float:
        """``r_g(x, y)`` of the module docstring; ``group=None``: the share-weighted population reward."""
        a = self.attributes(prompt, response, group)
        bonus = sum(w * g.topic_bonus for w, g in self._weighted(group))
        length_weight = sum(w * g.length_weight for w, g in self._weighted(group))
        return a["quality"] + bonus * a["relevance"] + length_weight * a["length"]

    def cyclic_term(self, a: str, b: str) -> float:
        """``c(a, b) = gamma * C[style(a), style(b)]`` (antisymmetric; 0 in transitive worlds)."""
        if self.cyclic_weight == 0.0:
            return 0.0
        sa, sb = response_style(a), response_style(b)
        if sa is None or sb is None or sa == sb:
            return 0.0
        return self.cyclic_weight if STYLE_BEATS[sa] == sb else -self.cyclic_weight

    def preference_logit(self, prompt: str, a: str, b: str, group: str | None = None) -> float:
        """``r_g(x, a) - r_g(x, b) + c(a, b)``: positive when a is preferred to b."""
        return self.true_reward(prompt, a, group) - self.true_reward(prompt, b, group) + self.cyclic_term(a, b)

    def preference_prob(self, prompt: str, a: str, b: str, group: str | None = None, temperature: float = 1.0) -> float:
        """P(a preferred to b) for a Bradley-Terry user with ``temperature``; ``group=None``: for a user
        drawn from the population, ``sum_g s_g sigmoid(logit_g / T)``."""
        return sum(
            w * sigmoid(self.preference_logit(prompt, a, b, g.name) / temperature) for w, g in self._weighted(group)
        )

    def step_rewards(self, prompt: str, steps: list[str], group: str | None = None) -> list[float]:
        """The true reward of each step on its own; they sum to the reward of the joined steps
        (the reward is additive over words)."""
        return [self.true_reward(prompt, step, group) for step in steps]


def sigmoid(x: float) -> float:
    """The logistic function, stable for large |x|."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def prompt_topic(prompt: str) -> str | None:
    """The first topic name among the prompt's words (None when it names no topic)."""
    return next((w for w in prompt.split() if w in TOPICS), None)


def response_style(response: str) -> str | None:
    """The style with the most marker words in ``response``; None on a tie or when none occurs."""
    counts = {s: 0 for s in STYLES}
    for word in response.split():
        if word in _STYLE_OF_WORD:
            counts[_STYLE_OF_WORD[word]] += 1
    best = max(counts.values())
    winners = [s for s, c in counts.items() if c == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


def _noise(rng: np.random.Generator) -> dict[str, float]:
    """Seeded small utilities N(0, 0.2) of the filler and topic words (what the seed changes)."""
    return {w: float(rng.normal(0.0, 0.2)) for w in FILLER_WORDS + tuple(_TOPIC_OF_WORD)}


def _utilities(noise: dict[str, float], style_values: dict[str, float], good: float = 1.0) -> dict[str, float]:
    """Good words ``+good``, bad words -1, style markers by ``style_values`` (default 0), the rest ``noise``."""
    u = dict(noise) | {w: good for w in GOOD_WORDS} | {w: -1.0 for w in BAD_WORDS}
    return u | {w: style_values.get(style, 0.0) for w, style in _STYLE_OF_WORD.items()}


def _single(length_weight: float, cyclic_weight: float):
    def build(rng: np.random.Generator) -> tuple[list[Group], float]:
        group = Group("all", 1.0, _utilities(_noise(rng), {}), topic_bonus=0.5, length_weight=length_weight)
        return [group], cyclic_weight

    return build


def _two_groups(rng: np.random.Generator) -> tuple[list[Group], float]:
    noise = _noise(rng)
    majority = _utilities(noise, {"formal": 0.5, "casual": -0.5})
    minority = _utilities(noise, {"formal": -0.5, "casual": 0.5}, good=0.5)
    return [
        Group("majority", 0.7, majority, topic_bonus=0.5, length_weight=-0.05),
        Group("minority", 0.3, minority, topic_bonus=0.2, length_weight=0.1),
    ], 0.0


# name -> (builder, description). A builder maps a seeded Generator to (groups, cyclic_weight).
PRESETS = {
    "default": (_single(0.0, 0.0), "one group; topic bonus 0.5, no length term"),
    "verbose": (
        _single(0.3, 0.0),
        "one group that rewards length (lambda = 0.3): a world where length can be exploited",
    ),
    "groups": (
        _two_groups,
        "two groups: majority (70 %) likes formal and dislikes casual words, lambda = -0.05; "
        "minority (30 %) the opposite, weaker liking of good words, lambda = +0.1",
    ),
    "cyclic": (_single(0.0, 1.5), "one group plus a rock-paper-scissors style term (gamma = 1.5)"),
}


def make_world(name: str = "default", seed: int = 0) -> World:
    """The preset world ``name`` (see `PRESETS`); ``seed`` draws the small utilities of filler and topic
    words, so equal (name, seed) give equal worlds."""
    if name not in PRESETS:
        raise ValueError(f"unknown world {name!r}; expected one of {', '.join(PRESETS)}")
    groups, cyclic_weight = PRESETS[name][0](np.random.default_rng(seed))
    return World(name=name, groups=groups, cyclic_weight=cyclic_weight)
