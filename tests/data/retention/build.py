"""Builds conversations.json: multi-turn conversations with planted facts, written for thrifty's
summary-retention study (tests/benchmarks/summary_retention.py). Deterministic: run it again and
the file is byte-for-byte the same. See README.md beside it."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# Each scenario: a system prompt, the user's opening message, planted facts (said early, each with
# the strings that must all appear upstream for the fact to count as kept), the user's filler
# questions, and the final question. Facts are stated in turns 2 to 11, so a budget-bound prune
# drops them: only a summary can carry them to the upstream.
SCENARIOS: list[dict[str, Any]] = [
    {
        "id": "travel",
        "system": "You are the travel desk assistant of a small consulting firm.",
        "opening": "I need help organising a business trip for our team next month.",
        "facts": [
            ("The traveller is Anna Berg from the finance team.", ["Anna Berg"]),
            ("We decided on Hotel Bristol in Oslo.", ["Bristol"]),
            ("She stays 3 nights, checking in on 14 March.", ["14 March"]),
            ("The agreed room rate is 1,450 NOK per night.", ["1,450"]),
            ("Her flight is SK4035 from Bergen.", ["SK4035"]),
        ],
        "questions": [
            "Is it better to take the airport train or a taxi into the city?",
            "What should she pack for the weather at that time of year?",
            "Can you suggest a place for a team dinner near the centre?",
            "How early should she be at the airport for a domestic flight?",
            "Do we need travel insurance for a domestic trip?",
            "What is the usual tipping practice in restaurants there?",
            "Should she bring cash or is card accepted everywhere?",
            "Any advice on working from the hotel lobby?",
            "How do expense reports usually work for trips like this?",
            "What if the meeting runs late on the last day?",
            "Is there a good gym near the centre?",
            "How do we handle a late check-out request?",
        ],
        "final": "Please write the confirmation email: who travels, which hotel, dates, rate and flight.",
    },
    {
        "id": "incident",
        "system": "You are an SRE assistant helping write incident reports.",
        "opening": "We had an outage yesterday and I need to write it up properly.",
        "facts": [
            ("The incident commander was Priya Raman.", ["Priya Raman"]),
            ("The outage began at 14:32 UTC and lasted 47 minutes.", ["14:32", "47 minutes"]),
            ("The root cause was a bad config push to the payments-gateway service.", ["payments-gateway"]),
            ("About 12,800 checkout requests failed.", ["12,800"]),
            ("We agreed that every config push must now go through a canary stage.", ["canary"]),
        ],
        "questions": [
            "How should the timeline section be structured?",
            "What tone should the summary for executives have?",
            "Should we name individual engineers in the report?",
            "How much detail about the monitoring gaps is useful?",
            "What is a good way to present customer impact?",
            "How do other companies phrase their apology to customers?",
            "Should we include graphs from the dashboards?",
            "How do we track the follow-up actions?",
            "What makes a blameless postmortem actually blameless?",
            "Who should review the draft before it is published?",
            "How long should the whole report be?",
            "Should the report mention the on-call rotation?",
        ],
        "final": "Draft the incident summary paragraph with the commander, start time, duration, cause, impact and the decision.",
    },
    {
        "id": "hiring",
        "system": "You are an assistant for a hiring manager.",
        "opening": "I'm running the hiring loop for a backend engineer role and want to keep things organised.",
        "facts": [
            ("The strongest candidate so far is Jonas Lindqvist.", ["Jonas Lindqvist"]),
            ("His final interview is on Thursday 9 October at 10:00.", ["9 October"]),
            ("We decided the salary band tops out at 92,000 EUR.", ["92,000"]),
            ("The hiring committee is chaired by Maria Okafor.", ["Maria Okafor"]),
            ("He needs a visa, so the start date cannot be before 1 December.", ["1 December"]),
        ],
        "questions": [
            "What questions work well for a system design interview?",
            "How do we keep interviewers calibrated?",
            "Should we give a take-home assignment?",
            "How fast should we get back to candidates?",
            "What is a fair way to compare candidates from different backgrounds?",
            "How do we sell the team to a strong candidate?",
            "What should the reference check cover?",
            "How many interviewers is too many?",
            "Should we share the salary range early?",
            "How do we handle a counter-offer?",
            "What does a good onboarding plan look like?",
            "How do we write a rejection email that is kind?",
        ],
        "final": "Summarise where we are with the candidate: name, interview date, salary cap, chair and earliest start.",
    },
    {
        "id": "wedding",
        "system": "You are a friendly event planning assistant.",
        "opening": "My sister and I are planning her wedding and we keep losing track of details.",
        "facts": [
            ("The wedding is on Saturday 21 June.", ["21 June"]),
            ("We booked the Rosewood Barn as the venue.", ["Rosewood Barn"]),
            ("The guest list is fixed at 86 people.", ["86"]),
            ("The caterer is Luca Moretti, and we agreed on the lemon risotto menu.", ["Luca Moretti", "risotto"]),
            ("The total budget must stay under 18,500 dollars.", ["18,500"]),
        ],
        "questions": [
            "How far ahead should invitations go out?",
            "What are good ideas for table decorations?",
            "How do we handle guests with dietary restrictions?",
            "Should we hire a day-of coordinator?",
            "What music works for the ceremony?",
            "How long should the speeches be?",
            "What do we do if it rains?",
            "How do we arrange the seating plan without drama?",
            "What should be in the welcome bags?",
            "How do we thank the vendors afterwards?",
            "What is a realistic timeline for the day?",
            "Should children be invited?",
        ],
        "final": "Write a brief for the coordinator with the date, venue, head count, caterer and menu, and budget.",
    },
    {
        "id": "research",
        "system": "You are a research assistant for a university lab.",
        "opening": "I'm preparing our grant progress report and need to keep the key facts straight.",
        "facts": [
            ("The grant number is NSF-2231947.", ["2231947"]),
            ("Our principal investigator is Dr. Helen Achterberg.", ["Achterberg"]),
            ("We recruited 312 participants by the end of August.", ["312"]),
            ("The lab decided to drop the fMRI arm of the study.", ["fMRI"]),
            ("The report is due on 15 November.", ["15 November"]),
        ],
        "questions": [
            "How should the results section be organised?",
            "How do we describe delays without sounding defensive?",
            "What belongs in the broader impacts section?",
            "Should we include preliminary figures?",
            "How do we present the budget changes?",
            "What do reviewers look for in a progress report?",
            "How formal should the language be?",
            "How do we mention the students who worked on it?",
            "Should we list conference talks separately?",
            "How do we describe data sharing plans?",
            "What if some aims are no longer feasible?",
            "How long should the executive summary be?",
        ],
        "final": "Write the opening paragraph: grant number, PI, recruitment figure, the change to the design, and the due date.",
    },
    {
        "id": "procurement",
        "system": "You are a procurement assistant for an IT department.",
        "opening": "We are replacing the laptops for the support team and I want to get the order right.",
        "facts": [
            ("We are ordering 42 laptops.", ["42"]),
            ("We chose the ThinkPad T14 Gen 5 model.", ["T14"]),
            ("The supplier is Nordic Office Supply, contact Erik Halvorsen.", ["Erik Halvorsen"]),
            ("The agreed unit price is 1,129 euros.", ["1,129"]),
            ("Delivery must be completed by 30 January.", ["30 January"]),
        ],
        "questions": [
            "What warranty level makes sense for support staff?",
            "Should we buy docking stations as well?",
            "How do we dispose of the old laptops securely?",
            "Is leasing better than buying?",
            "How do we roll out the new machines with little downtime?",
            "What accessories do people usually forget?",
            "How do we set up the device management enrolment?",
            "Should we standardise on one keyboard layout?",
            "What should the acceptance test on delivery look like?",
            "How do we budget for spare units?",
            "How do we communicate the change to the team?",
            "What about software licences on the new devices?",
        ],
        "final": "Write the purchase order summary: quantity, model, supplier contact, unit price and delivery deadline.",
    },
    {
        "id": "launch",
        "system": "You are a product marketing assistant.",
        "opening": "We're planning the launch of our new app feature and I'd like a single place for decisions.",
        "facts": [
            ("The feature is called Smart Folders.", ["Smart Folders"]),
            ("Launch day is Tuesday 4 February.", ["4 February"]),
            ("The launch owner is Kenji Watanabe.", ["Kenji Watanabe"]),
            ("We agreed to offer it free for 60 days, then 4.99 dollars a month.", ["60 days", "4.99"]),
            ("The beta had 2,340 users.", ["2,340"]),
        ],
        "questions": [
            "What channels should we use for the announcement?",
            "How long should the launch blog post be?",
            "Should we do a webinar?",
            "How do we brief the support team?",
            "What metrics should we watch in the first week?",
            "How do we collect feedback from early users?",
            "Should we contact press or just post on social media?",
            "What screenshots work best in the app store?",
            "How do we handle negative reviews?",
            "Should the email go out in the morning or the afternoon?",
            "How do we test the onboarding flow?",
            "What is a good follow-up campaign?",
        ],
        "final": "Write the launch announcement's first paragraph with the feature name, date, owner, pricing and beta numbers.",
    },
    {
        "id": "renovation",
        "system": "You are a home renovation planning assistant.",
        "opening": "We're renovating our kitchen and I want to keep the plan in one place.",
        "facts": [
            ("Our contractor is Sofia Marquez of Marquez Builders.", ["Sofia Marquez"]),
            ("Work starts on 3 April and should take 6 weeks.", ["3 April", "6 weeks"]),
            ("We decided on oak cabinets with a quartz worktop.", ["oak", "quartz"]),
            ("The quote came to 27,600 pounds.", ["27,600"]),
            ("The permit reference is BR-58817.", ["58817"]),
        ],
        "questions": [
            "How do we live without a kitchen for weeks?",
            "What lighting works best over a worktop?",
            "Should the sink go under the window?",
            "How do we protect the rest of the house from dust?",
            "What appliances should we order early?",
            "How many sockets do we need?",
            "What flooring goes well with that kind of kitchen?",
            "How do we check the work as it goes?",
            "Should we move the radiator?",
            "How do we keep the neighbours happy?",
            "What do we do if the budget starts to slip?",
            "How do we plan the storage?",
        ],
        "final": "Summarise the project for our insurer: contractor, start date and duration, materials, quote and permit.",
    },
]

# Written after the extractive summarizer's heuristics were last changed, and never used to tune
# them: facts inside longer messages, some stated by the assistant, some with no digits at all.
HELD_OUT: list[dict[str, Any]] = [
    {
        "id": "heldout-moving",
        "system": "You help people plan a house move.",
        "opening": "We're moving house soon and it's chaos, can you help me keep track?",
        "facts": [
            ("Honestly the van is the least of it, though we went with Fairway Removals in the end.", ["Fairway Removals"]),
            ("My partner Tomasz handles the utilities, I do the packing.", ["Tomasz"]),
            ("The keys to the new flat come on the twelfth of May, which is a Monday.", ["twelfth of May"]),
            ("The piano goes to my aunt in Leeds rather than with us.", ["piano", "Leeds"]),
            ("Our deposit back from the landlord should be 2,200 pounds.", ["2,200"]),
        ],
        "questions": [
            "How many boxes does a two-bedroom flat usually need?",
            "What should we pack first?",
            "How do we move the fridge safely?",
            "Should we redirect our post?",
            "What goes in the first-night box?",
            "How do we keep the cat calm during the move?",
            "What do we clean before handing back the old place?",
            "How do we label boxes sensibly?",
            "Should we take photos of the meter readings?",
            "What do we do with food in the freezer?",
        ],
        "final": "Remind me of the key arrangements: mover, who does what, key date, the piano, and the deposit.",
    },
    {
        "id": "heldout-course",
        "system": "You are an assistant for a teacher planning a course.",
        "opening": "I'm putting together a short evening course and want to nail down the logistics.",
        "facts": [
            ("The course is an introduction to bookbinding, which I've taught twice before.", ["bookbinding"]),
            ("Classes run on Wednesday evenings in room B214 of the community centre.", ["B214"]),
            ("We capped it at 14 students because of the number of presses.", ["14 students"]),
            ("The co-teacher is Ingrid Solheim, she brings the leather.", ["Ingrid Solheim"]),
            ("After some back and forth the fee ended up at 180 kroner per session.", ["180 kroner"]),
        ],
        "questions": [
            "How should I structure the first session?",
            "What tools should students bring themselves?",
            "How do I handle students at very different levels?",
            "Should I give homework?",
            "How do I keep the room tidy with glue everywhere?",
            "What is a good final project?",
            "How do I collect feedback at the end?",
            "How should I advertise the course?",
            "What if someone misses a session?",
            "How long should each demonstration be?",
        ],
        "final": "Write the course flyer text with the topic, the room, the class size, the co-teacher and the fee.",
    },
    {
        "id": "heldout-car",
        "system": "You are a helpful assistant.",
        "opening": "I'm buying a used car and want to think it through with you.",
        "facts": [
            ("The one I like best is a blue Skoda Octavia estate.", ["Octavia"]),
            ("It has done about 86,000 km and the seller is asking 9,900 euros.", ["86,000", "9,900"]),
            ("The seller, a retired teacher called Mr. Dufresne, lives in Lyon.", ["Dufresne"]),
            ("My mechanic friend Yusuf said the timing belt was replaced last year.", ["timing belt"]),
            ("I told him I'd give an answer by Friday the 7th.", ["7th"]),
        ],
        "questions": [
            "What should I check on a test drive?",
            "How do I negotiate the price?",
            "Is an estate car practical in a city?",
            "What paperwork do I need for a private sale?",
            "Should I pay by bank transfer or cash?",
            "How do I check the car's history?",
            "What running costs should I expect?",
            "Is diesel still a good idea?",
            "How important are winter tyres?",
            "What about insurance for a first car?",
        ],
        "final": "Summarise the deal for my partner: the car, mileage and price, seller, the mechanic's note, my deadline.",
    },
]

ANSWER_PARTS = [
    "That depends a little on your situation, but there are a few points worth weighing.",
    "Most teams find it helps to write the options down and compare them side by side.",
    "A common approach is to start simple and adjust once you see how it works in practice.",
    "You may want to check with the people affected before committing to anything.",
    "It is usually worth leaving some slack in the schedule for surprises.",
    "Cost matters, but so does the time people spend dealing with the consequences.",
    "If in doubt, ask someone who has done it recently what they would do differently.",
    "Keep a short written record so nobody has to rely on memory later.",
    "There is rarely a single right answer here, and reasonable people disagree.",
    "The details matter less than being consistent once you pick an approach.",
    "Some people prefer a checklist, others a simple shared document; either can work.",
    "Think about what would happen in the worst case and whether you could live with it.",
    "It can help to set a reminder a week before anything important is due.",
    "Communicating early tends to save a lot of back and forth later on.",
    "If the first attempt does not work out, you can always revisit the choice.",
    "Try not to over-plan; a good enough plan that everyone understands beats a perfect one.",
]
ACKS = [
    "Noted, I'll keep that in mind.",
    "Got it, thanks for confirming.",
    "Understood, I've recorded that.",
    "Thanks, that's clear.",
    "Okay, noted.",
]


def build(scenario: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    messages = [{"role": "system", "content": scenario["system"]}, {"role": "user", "content": scenario["opening"]}]
    messages.append({"role": "assistant", "content": "Happy to help. Tell me the details as you have them."})
    questions = list(scenario["questions"])
    rng.shuffle(questions)
    for fact, _ in scenario["facts"]:
        messages.append({"role": "user", "content": f"{fact} {rng.choice(questions[:4])}"})
        messages.append({"role": "assistant", "content": f"{rng.choice(ACKS)} " + " ".join(rng.sample(ANSWER_PARTS, 3))})
    for question in questions + questions[::-1]:  # each asked twice, as people do in long chats
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": " ".join(rng.sample(ANSWER_PARTS, 5))})
    messages.append({"role": "user", "content": scenario["final"]})
    facts = [{"fact": fact, "must_contain": keys} for fact, keys in scenario["facts"]]
    return {"id": scenario["id"], "held_out": scenario["id"].startswith("heldout-"), "messages": messages, "facts": facts}


def main() -> None:
    rng = random.Random(2026)
    conversations = [build(s, rng) for s in SCENARIOS + HELD_OUT]
    text = json.dumps({"conversations": conversations}, indent=1, ensure_ascii=False) + "\n"
    (HERE / "conversations.json").write_text(text, encoding="utf-8")
    print(f"{len(conversations)} conversations, {sum(len(c['facts']) for c in conversations)} facts")


if __name__ == "__main__":
    main()
