"""The cheap task classifier on hand-written labelled messages.

Two sets, written before the classifier's cues: ``LABELLED`` (12 per class), which the cues
were then tuned on, and ``HELDOUT`` (6 per class), scored once after tuning and not used to
tune. Measured (this module's test, 2026-11-23): labelled 92/96 = 95.8%, held-out 46/48 =
95.8%. The held-out figure is the honest one, and 48 messages is a small sample: expect
lower accuracy on real traffic. The tests hold both at >= 90% so a change to the cues that
loses accuracy fails here. Speed: see ``tests.benchmarks.policy_eval``.
"""

from __future__ import annotations

from collections import Counter

import pytest

from proxy.policy.classify import CLASSES, classify

LABELLED = [
    # chat
    ("hi there!", "chat"),
    ("Hello, how are you today?", "chat"),
    ("thanks, that was helpful", "chat"),
    ("What's the capital of Australia?", "chat"),
    ("Can you recommend a good book for a long flight?", "chat"),
    ("who won the world cup in 2018", "chat"),
    ("good morning! any tips for staying focused at work?", "chat"),
    ("What time zone is Chicago in?", "chat"),
    ("tell me something interesting about octopuses", "chat"),
    ("Is it safe to eat raw cookie dough?", "chat"),
    ("I'm bored, what should I do this weekend?", "chat"),
    ("ok cool", "chat"),
    # code
    ("Write a Python function that checks whether a string is a palindrome.", "code"),
    ("Why does this throw a TypeError?\n```js\nconst x = undefined; x.foo();\n```", "code"),
    ("How do I reverse a linked list in Java?", "code"),
    ("Fix the bug: def add(a, b): return a - b", "code"),
    ("Write a SQL query that returns the top 5 customers by revenue.", "code"),
    ("Refactor this React component to use hooks instead of a class.", "code"),
    ("What's the difference between a list and a tuple in Python?", "code"),
    ("My Rust program fails to compile with 'borrowed value does not live long enough'", "code"),
    ("Write a bash script that renames all .txt files in a folder to .md", "code"),
    ("Traceback (most recent call last):\n  File \"app.py\", line 3, in <module>\nKeyError: 'id'", "code"),
    ("implement binary search in go", "code"),
    ("How do I center a div with CSS flexbox?", "code"),
    # math
    ("What is 17 * 23?", "math"),
    ("Solve for x: 3x + 7 = 22", "math"),
    ("What is the derivative of x^3 * sin(x)?", "math"),
    ("Compute the integral of 1/(1+x^2) from 0 to 1.", "math"),
    ("If I roll two dice, what's the probability the sum is 7?", "math"),
    ("Prove that the square root of 2 is irrational.", "math"),
    ("What is 15% of 240?", "math"),
    ("Find the eigenvalues of the matrix [[2, 1], [1, 2]].", "math"),
    ("A train travels 120 km in 1.5 hours. What is its average speed?", "math"),
    ("simplify (x^2 - 9)/(x - 3)", "math"),
    ("How many ways can 5 people sit in a row?", "math"),
    ("Calculate the compound interest on $1000 at 5% for 3 years.", "math"),
    # reasoning
    ("Should we use microservices or a monolith for a 5-person startup? Weigh the trade-offs.", "reasoning"),
    ("Explain why the Roman Empire fell, considering economic and military causes.", "reasoning"),
    ("Compare nuclear and solar power for a country's baseload electricity.", "reasoning"),
    ("Think step by step: if all bloops are razzies and some razzies are lazzies, are some bloops lazzies?", "reasoning"),
    ("What are the pros and cons of remote work for junior engineers?", "reasoning"),
    ("Analyze the implications of raising interest rates on housing prices.", "reasoning"),
    ("A farmer needs to cross a river with a wolf, a goat and a cabbage. How does he do it?", "reasoning"),
    ("Why might a company choose to lease rather than buy its equipment?", "reasoning"),
    ("Evaluate this argument: because sales rose after the ad campaign, the campaign caused the rise.", "reasoning"),
    ("Plan a strategy for migrating our database with zero downtime.", "reasoning"),
    ("What would happen to global trade if the Suez Canal closed for a year?", "reasoning"),
    ("Which is the better long-term investment, index funds or individual stocks, and why?", "reasoning"),
    # extraction
    ("Extract all email addresses from the following text: contact bob@x.com or alice@y.org", "extraction"),
    ("From this invoice, pull out the invoice number, date and total amount.", "extraction"),
    ("List all the people mentioned in this paragraph: Marie met Pierre and Albert in Paris.", "extraction"),
    ("Return the product name, price and SKU as JSON: 'Blue Mug, $12.99, SKU 4471'", "extraction"),
    (
        "Identify the named entities (people, organizations, places) in: Tim Cook announced Apple's new campus in Austin.",
        "extraction",
    ),
    ("Parse this address into street, city and postcode: 10 Downing St, London SW1A 2AA", "extraction"),
    (
        "Find all dates in this text and output them in ISO format: the meeting moved from March 3 to April 10, 2024.",
        "extraction",
    ),
    ("What is the customer's phone number in this ticket? 'Hi, call me back at 555-0134, thanks, Jo'", "extraction"),
    ("Fill these fields from the resume below: name, years of experience, last employer.", "extraction"),
    ("Get the key-value pairs from this log line: user=42 action=login status=ok", "extraction"),
    ("Classify the sentiment of each review as positive or negative and output a table.", "extraction"),
    ("Pull the action items out of these meeting notes.", "extraction"),
    # summarize
    (
        "Summarize this article in three bullet points: The city council voted on Tuesday to expand the bike lane network...",
        "summarize",
    ),
    ("tl;dr this thread please", "summarize"),
    ("Give me the key points of the following report.", "summarize"),
    ("Can you condense this email into one sentence? 'Hi team, as discussed, the launch moves to Friday...'", "summarize"),
    ("What's the gist of this paper's abstract?", "summarize"),
    ("Write a short summary of the plot of Hamlet.", "summarize"),
    ("Recap the main points of our conversation so far.", "summarize"),
    ("Shorten this paragraph to under 50 words.", "summarize"),
    ("Boil this down for an executive: the Q3 numbers show revenue up 4% but margins down due to freight costs.", "summarize"),
    ("Give a brief overview of what this document says.", "summarize"),
    ("summarise the meeting transcript below", "summarize"),
    ("In two sentences, what is this story about?", "summarize"),
    # translate
    ("Translate 'where is the train station' into French.", "translate"),
    ("How do you say 'thank you very much' in Japanese?", "translate"),
    ("Translate this paragraph to Spanish: We are pleased to announce our new office.", "translate"),
    ("What does 'Schadenfreude' mean in English?", "translate"),
    ("Put this into German: the meeting is postponed until next week.", "translate"),
    ("¿Puedes traducir esto al inglés? 'Me gusta mucho la playa'", "translate"),
    ("translate to italian: good luck with the exam", "translate"),
    ("Render this English sentence in Portuguese: the shop opens at nine.", "translate"),
    ("Can you give me the Chinese for 'happy birthday'?", "translate"),
    ("Translate the following menu items from Korean to English.", "translate"),
    ("What's the Dutch word for 'bicycle'?", "translate"),
    ("english to russian please: I will call you tomorrow", "translate"),
    # creative
    ("Write a haiku about autumn rain.", "creative"),
    ("Tell me a bedtime story about a dragon who is afraid of the dark.", "creative"),
    ("Write a limerick about a cat who loves lasagna.", "creative"),
    ("Come up with five catchy slogans for a coffee shop.", "creative"),
    ("Write a short poem for my mom's 60th birthday.", "creative"),
    ("Imagine a world where gravity reverses every Tuesday. Describe a day in it.", "creative"),
    ("Write song lyrics about leaving home for the first time.", "creative"),
    ("Tell me a joke about programmers.", "creative"),
    ("Write the opening paragraph of a noir detective novel.", "creative"),
    ("Give me a creative name and tagline for a vegan bakery.", "creative"),
    ("Write a sonnet about the sea.", "creative"),
    ("Draft a funny toast for my best friend's wedding.", "creative"),
]

HELDOUT = [
    ("hey, what's up?", "chat"),
    ("Where is the Eiffel Tower?", "chat"),
    ("Any good podcast suggestions about history?", "chat"),
    ("what's a good name for a goldfish", "chat"),
    ("How tall is Mount Everest?", "chat"),
    ("thank you so much!", "chat"),
    ("Write a JavaScript function to debounce another function.", "code"),
    ("Why is my Docker container exiting immediately with code 137?", "code"),
    ("Convert this loop to a list comprehension: for i in range(10): out.append(i*i)", "code"),
    ("How do I read a CSV file with pandas and drop empty rows?", "code"),
    ("Write a unit test for a function that parses dates.", "code"),
    ("git says 'detached HEAD', how do I get back to my branch?", "code"),
    ("What is 12 squared minus 44?", "math"),
    ("Solve the system: x + y = 10, x - y = 2", "math"),
    ("What is the area of a circle with radius 4 cm?", "math"),
    ("Find the limit of (1 + 1/n)^n as n goes to infinity.", "math"),
    ("Expected value of a fair six-sided die?", "math"),
    ("Convert 0.375 to a fraction in lowest terms.", "math"),
    ("Is it better to rent or buy a home in a city with rising prices? Reason it through.", "reasoning"),
    ("Why do some startups fail even with good products?", "reasoning"),
    ("Critique this business plan and point out its weakest assumptions.", "reasoning"),
    ("If every manager is an employee and Sam is not an employee, can Sam be a manager? Explain.", "reasoning"),
    ("Weigh the ethical considerations of using AI in hiring decisions.", "reasoning"),
    ("What factors should I consider when choosing between two job offers?", "reasoning"),
    ("Extract the company names from this press release.", "extraction"),
    ("Give me every URL that appears in the text below.", "extraction"),
    ("From the receipt, list each item and its price.", "extraction"),
    ("Output the author, title and year of each citation as JSON.", "extraction"),
    ("Which cities are mentioned in this travel blog post?", "extraction"),
    ("Pull out the error codes from these logs.", "extraction"),
    ("Summarize the following customer complaint in one line.", "summarize"),
    ("Can you give me a TL;DR of this long Slack thread?", "summarize"),
    ("Sum up this chapter for me.", "summarize"),
    ("What are the main takeaways of this blog post?", "summarize"),
    ("Condense these release notes into a short changelog entry.", "summarize"),
    ("Briefly summarize the history of the Internet.", "summarize"),
    ("Translate 'I love you' into Korean.", "translate"),
    ("How would you say 'see you later' in Italian?", "translate"),
    ("Please translate this email into polite Japanese.", "translate"),
    ("What's 'butterfly' in Spanish?", "translate"),
    ("Traduis en anglais : je suis fatigué", "translate"),
    ("French to English: il pleut des cordes", "translate"),
    ("Write a short story about a robot learning to paint.", "creative"),
    ("Compose a rap verse about morning coffee.", "creative"),
    ("Write a poem about the moon in the style of Emily Dickinson.", "creative"),
    ("Invent a myth explaining why cats purr.", "creative"),
    ("Brainstorm ten fantasy names for a dwarven city.", "creative"),
    ("Write a cheesy pickup line about astronomy.", "creative"),
]


def accuracy(examples: list[tuple[str, str]]) -> tuple[float, list[str]]:
    wrong = [f"{label} -> {classify(text)}: {text[:60]!r}" for text, label in examples if classify(text) != label]
    return 1 - len(wrong) / len(examples), wrong


def test_the_sets_cover_every_class() -> None:
    assert set(Counter(label for _, label in LABELLED)) == set(CLASSES)
    assert set(Counter(label for _, label in HELDOUT)) == set(CLASSES)


@pytest.mark.parametrize(("name", "examples"), [("labelled", LABELLED), ("held-out", HELDOUT)])
def test_accuracy_on_hand_written_messages(name: str, examples: list[tuple[str, str]]) -> None:
    share, wrong = accuracy(examples)
    assert share >= 0.90, f"{name}: {share:.1%}; wrong: {wrong}"


@pytest.mark.parametrize("label", CLASSES)
def test_each_class_is_mostly_right_on_the_labelled_set(label: str) -> None:
    mine = [(text, lab) for text, lab in LABELLED if lab == label]
    assert accuracy(mine)[0] >= 0.75


def test_structure_counts_where_words_do_not() -> None:
    assert classify("```\nfoo = bar(1)\n```\nwhat now") == "code"
    assert classify("12 * 7 = ?") == "math"
    assert classify("name, age, city") == "chat"
    assert classify("name, age, city", json_mode=True) == "extraction"
    assert classify("") == "chat"


def test_only_the_head_and_tail_of_a_long_message_are_read() -> None:
    document = "The council met on Tuesday and discussed the budget for the new library. " * 200
    assert classify("Summarize this report:\n" + document) == "summarize"
    assert classify(document + "\nTranslate the text above into French.") == "translate"
    assert classify(document[:300] + "write a haiku" + document) != "creative"  # buried in the middle: not read
