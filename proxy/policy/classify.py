"""The cheap task classifier behind the ``task_class`` matcher: the last user message to one of
:data:`CLASSES`, in microseconds and without a model.

It runs in the route stage, inside ``features.extract``, and only when some rule of the live
policy matches on ``task_class`` (so a policy that does not use it pays nothing). It scores
each class by weighted cues: words and word stems from a small lexicon, two-word phrases,
and a few structural signals (a code fence or code-like syntax for ``code``, arithmetic for
``math``, JSON mode for ``extraction``). Only the head and tail of a long message are read:
that is where people put the instruction ("summarize this: <document>", "<code> why does
this fail?"). The highest score wins, ties going to the earlier class in :data:`CLASSES`
after ``chat``; a message with no cue strong enough (a score under 2) is ``chat``.

Measured on hand-written labelled messages (tests/policy/test_classify.py): the figures are
in that module's docstring. It is a router's heuristic, not a judge: a wrong class costs a
more expensive model or a cascade escalation, never a wrong answer by itself.
"""

from __future__ import annotations

import itertools
import re
import string

CLASSES = ("chat", "code", "math", "reasoning", "extraction", "summarize", "translate", "creative")
_INDEX = {name: i for i, name in enumerate(CLASSES)}
_HEAD = 300  # characters read from the start of a long message
_TAIL = 200  # and from its end
_THRESHOLD = 2

# "word=weight" entries per class; "stem*" matches any word starting with the stem, and
# "two words" matches that pair of consecutive words.
_CUES = {
    "chat": "hi=3 hello=3 hey=3 thanks=3 thank=2 morning=1 bored=2 recommend=1 suggestions=1 suggestion=1 cool=1 ok=1",
    "code": (
        "code=2 coding=2 function=2 functions=2 python=3 javascript=3 typescript=3 java=3 rust=3 golang=3 sql=3 bash=3 "
        "css=3 html=3 react=3 docker=3 git=3 pandas=3 numpy=2 api=1 bug=2 debug*=3 compil*=3 refactor*=3 implement=2 "
        "script=1 regex=3 exception=2 traceback=3 stack=1 variable=1 loop=2 recursion=2 recursive=2 array=2 "
        "tuple=2 dict=2 linked=1 class=1 method=1 query=2 repository=2 branch=1 commit=1 deploy=1 container=1 "
        "flexbox=3 div=2 json=1 csv=1 unittest=3 endpoint=2 async=2 runtime=1 segfault=3 null=1 undefined=2 "
        "binary search=2 unit test=3 list comprehension=3 pull request=3 a function=2"
    ),
    "math": (
        "solve=3 equation=3 equations=3 integral=4 derivative=4 differentiate=4 integrate=3 probability=3 "
        "calculate=2 compute=2 sum=1 percent=2 sqrt=3 algebra=3 theorem=3 prove=2 proof=2 matrix=3 "
        "eigenvalues=4 eigenvalue=4 simplify=3 factor=2 fraction=3 squared=3 cubed=3 limit=2 infinity=2 "
        "area=2 radius=3 circumference=3 volume=1 average=1 mean=1 median=2 dice=2 die=1 expected value=3 "
        "interest=1 compound interest=3 speed=1 km=1 irrational=3 prime=2 ways=1 how many=1 lowest terms=3"
    ),
    "reasoning": (
        "why=1 explain=1 reason=2 reasoning=2 compare=3 comparison=3 versus=2 vs=2 tradeoff*=3 trade=1 "
        "pros and=2 and cons=2 analy*=3 implication*=3 evaluate=2 critique=3 assess=2 argument=2 strategy=2 "
        "plan=2 should=1 better=1 consider*=2 factors=2 weigh=3 ethical=2 ethics=2 cause=1 causes=1 "
        "caused=1 puzzle=3 riddle=3 logic=2 logically=2 step by=3 think step=2 what would=2 would happen=2 "
        "if all=2 are some=2 assumptions=2 decide=2 decision=1 choose=1 invest*=1 long term=1"
    ),
    "extraction": (
        "extract*=4 pull out=3 pull the=2 list all=3 list each=2 find all=2 identify=2 entities=3 entity=2 "
        "named=1 parse=2 fields=3 field=1 fill=1 output=1 json=2 table=1 iso=1 format=1 mentioned=3 "
        "appears=2 every=1 each=1 emails=2 email addresses=3 phone number=2 addresses=1 dates=2 key value=3 "
        "classify=2 sentiment=2 label=1 sku=2 invoice=2 receipt=2 citation=2 action items=3 from the=1 "
        "from this=1 in this=1 below=1 urls=2 url=2 names=1 codes=1"
    ),
    "summarize": (
        "summar*=5 summaris*=5 tl=3 tldr=5 condense=4 gist=4 recap=4 shorten=3 overview=2 key points=3 "
        "main points=4 takeaways=4 boil=2 down for=1 briefly=2 brief=1 abstract=1 sum up=4 two sentences=2 "
        "one sentence=2 one line=2 words=1 about=1 short=1"
    ),
    "translate": (
        "translat*=5 tradu*=5 bersetz*=5 traduis=5 how do=1 you say=4 would you=1 word for=3 mean in=3 "
        "in english=2 into english=4 to english=3 in french=2 into french=4 to french=2 in spanish=2 "
        "into spanish=3 to spanish=3 in german=2 into german=4 in japanese=2 into japanese=3 in chinese=2 "
        "the chinese=3 in korean=2 into korean=4 in italian=2 to italian=3 in portuguese=2 in dutch=2 the dutch=3 "
        "to russian=3 english to=3 french to=3 polite=1 render=1 language=2 phrase=1 mean=1 inglés=4 anglais=4"
    ),
    "creative": (
        "poem=5 poems=5 poetry=5 haiku=5 limerick=5 sonnet=5 story=4 stories=4 lyrics=4 song=3 rap=3 verse=3 "
        "fiction=3 novel=3 tale=3 myth=3 slogan*=4 tagline=4 creative=3 imagine=3 invent=2 joke=4 jokes=4 "
        "funny=2 toast=3 rhyme=3 bedtime=3 fantasy=3 names for=2 name and=1 catchy=3 brainstorm=2 pickup line=4 "
        "once upon=4 opening paragraph=3 the style=2 write a=1 compose=2 draft=1 character=1 plot=1 cheesy=2"
    ),
}

# Code-like syntax and arithmetic: one regex search each (one pass in C over the text), and
# the math symbols as plain substring tests.
_CODE_MARKS = re.compile(r"def |function|=>|const |import |#include|\(\);|;\n|\{\n|</|select |error:|\.[a-z_]+\(")
_MATH_MARKS = ("^", "%", "√", "∫", "∑", "π", "×", "÷")
_ARITHMETIC = re.compile(r"\d ?[-+*/=] ?[\d(x]")
_SPACES = str.maketrans(dict.fromkeys(string.punctuation + string.digits, " "))  # ASCII text: words by split()
_WORD_ANY = re.compile(r"[^\W\d_]+")  # for text that is not all ASCII
_STEM = 5  # stems are looked up by their first five letters, then checked in full

Cues = dict[str, tuple[tuple[int, int], ...]]


def _compile() -> tuple[Cues, Cues, dict[str, tuple[tuple[str, int, int], ...]], frozenset[str]]:
    words: dict[str, list[tuple[int, int]]] = {}
    pairs: dict[str, list[tuple[int, int]]] = {}
    stems: dict[str, list[tuple[str, int, int]]] = {}
    for name, spec in _CUES.items():
        for entry in re.findall(r"([^=]+?)=(\d+)\s*", spec):
            cue, weight = entry[0].strip(), int(entry[1])
            assert cue.count(" ") <= 1, f"cues are words or pairs of words: {cue!r}"
            if cue.endswith("*"):
                assert len(cue) > _STEM, f"a stem has at least {_STEM} letters: {cue!r}"
                stems.setdefault(cue[:_STEM], []).append((cue[:-1], _INDEX[name], weight))
            else:
                (pairs if " " in cue else words).setdefault(cue, []).append((_INDEX[name], weight))
    firsts = frozenset(p.split(" ")[0] for p in pairs)
    return _freeze(words), _freeze(pairs), {k: tuple(v) for k, v in stems.items()}, firsts


def _freeze(table: dict[str, list[tuple[int, int]]]) -> Cues:
    return {k: tuple(v) for k, v in table.items()}


_WORDS, _PAIRS, _STEMS, _FIRSTS = _compile()


def classify(text: str, *, json_mode: bool = False) -> str:
    """The task class of a user message (any case)."""
    if len(text) > _HEAD + _TAIL:
        text = text[:_HEAD] + "\n" + text[-_TAIL:]
    lower = text.lower()
    plain = lower.translate(_SPACES) if lower.isascii() else None  # letters and spaces only
    words = plain.split() if plain is not None else _WORD_ANY.findall(lower)
    distinct = set(words)  # a cue counts once, however often it is repeated
    scores = [0] * len(CLASSES)
    # Comprehensions rather than one loop with branches: most words hit nothing, and a
    # comprehension's miss is a few tens of nanoseconds.
    hits = [_WORDS[w] for w in distinct if w in _WORDS]
    hits += [_PAIRS[p] for p in {f"{a} {b}" for a, b in itertools.pairwise(words) if a in _FIRSTS} if p in _PAIRS]
    for w, stems in [(w, _STEMS[w[:_STEM]]) for w in distinct if len(w) >= _STEM and w[:_STEM] in _STEMS]:
        hits.append(tuple((cls, weight) for stem, cls, weight in stems if w.startswith(stem)))
    for cues in hits:
        for cls, weight in cues:
            scores[cls] += weight
    if "```" in text:
        scores[1] += 4
    elif _CODE_MARKS.search(lower) is not None:
        scores[1] += 3
    if any(mark in lower for mark in _MATH_MARKS) or (plain != lower and _ARITHMETIC.search(lower) is not None):
        scores[2] += 3
    if json_mode:
        scores[4] += 2
    best = max(range(1, len(CLASSES)), key=lambda i: (scores[i], -i))
    return CLASSES[best] if scores[best] >= _THRESHOLD and scores[best] > scores[0] else "chat"
