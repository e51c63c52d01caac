"""Synthetic conversations in Gemma 4's chat format, the chat part of the bundled model's training data.

Why: the bundled model is the default model of every command, so it should speak the format the runtime reads and
writes: turns, tool declarations, tool calls and responses, thought channels, and JSON replies. A 3.5 M-parameter
model learns a format (markers, key names, quoting) but little meaning, so the conversations come from templates
whose answers can be read off the prompt: a call's arguments are words of the question, the answer after a tool
response repeats the response's values, a topic's explanation is a paragraph of that pydoc topic.

Every conversation is an OpenAI-style message list (assistant `tool_calls` with arguments as objects, `tool`
messages or Gemma's own `tool_responses`, `reasoning_content` for thoughts) rendered by the chat template through
transformers, as a user of the model would render it. Deterministic from the seed; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CITIES = ["Oslo", "Lima", "Paris", "Cairo", "Tokyo", "Berlin", "Madrid", "Nairobi", "Quito", "Dublin", "Seoul",
          "Lisbon", "Vienna", "Toronto", "Sydney", "Bergen", "Porto", "Accra", "Hanoi", "Prague"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowing", "clear"]
EXHIBITS = ["dinosaur hall", "space gallery", "Roman coins room", "butterfly house", "ocean tank", "map room",
            "clock tower", "Viking ship", "robot lab", "glass garden", "music room", "train hall"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
TOPICS = ["birds", "volcanoes", "trains", "chess", "gardening", "the moon", "castles", "bees", "jazz", "knots",
          "boats", "maps", "fossils", "bridges", "tea", "clocks", "whales", "deserts", "robots", "poetry"]
TITLE_WORDS = ["A Short Guide to", "The Book of", "All About", "Notes on", "The Story of", "Ten Facts on"]
NAMES = ["Ada", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kiri", "Leo", "Mei",
         "Nora", "Omar", "Pia", "Ravi", "Sara", "Tomas", "Yuki"]
LANGUAGES = ["english", "french", "german", "spanish", "italian"]
TASKS = ["call my mother", "check the oven", "take my pills", "feed the cat", "leave for the bus", "water the plants",
         "drink some water", "stretch my legs"]
SOUNDS = ["chime", "bell", "beep"]
CURRENCIES = {"euros": "EUR", "dollars": "USD", "pounds": "GBP", "yen": "JPY", "kroner": "NOK"}
PLACES = ["cafe", "main exit", "toilets", "gift shop", "cloakroom", "library", "lift", "first aid room"]
STEPS = ["Go straight ahead", "Turn left at the stairs", "Take the lift to floor 2", "Pass the gift shop",
         "Turn right after the cafe", "Follow the blue signs"]
PHRASES = {"good morning": {"french": "bonjour", "german": "guten Morgen", "spanish": "buenos dias",
                            "italian": "buongiorno", "english": "good morning"},
           "thank you": {"french": "merci", "german": "danke", "spanish": "gracias", "italian": "grazie",
                         "english": "thank you"},
           "where is the exit": {"french": "ou est la sortie", "german": "wo ist der Ausgang",
                                 "spanish": "donde esta la salida", "italian": "dove e l'uscita",
                                 "english": "where is the exit"},
           "good night": {"french": "bonne nuit", "german": "gute Nacht", "spanish": "buenas noches",
                          "italian": "buona notte", "english": "good night"}}
CATEGORIES = {"colours": ["red", "green", "blue", "yellow", "purple", "orange"],
              "fruits": ["apple", "pear", "plum", "mango", "cherry", "banana"],
              "planets": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn"],
              "animals": ["fox", "owl", "otter", "deer", "hare", "wolf"]}
SYSTEM_PROMPTS = ["You are the help desk of the city museum.", "You are a kiosk assistant. Be brief.",
                  "You are a helpful assistant.", "Answer the visitor's questions politely.",
                  "You help visitors of the library and the museum."]
JSON_ASKS = ["Reply in JSON.", "Answer with a JSON object.", "Respond only with JSON.", "Give the answer as JSON."]


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


def _string(description: str, **extra: Any) -> dict:
    return {"type": "string", "description": description, **extra}


TOOLS = {
    "get_weather": _function(
        "get_weather", "Current weather in a city.",
        {"city": _string("The city, e.g. Oslo"),
         "unit": _string("Temperature unit", enum=["celsius", "fahrenheit"])}, ["city"]),
    "get_opening_hours": _function(
        "get_opening_hours", "Opening hours of an exhibit of the museum.",
        {"exhibit": _string("Name of the exhibit"), "day": _string("Day of the week", enum=DAYS)}, ["exhibit"]),
    "set_volume": _function(
        "set_volume", "Set the kiosk's speaker volume.",
        {"level": {"type": "integer", "description": "Volume from 0 (mute) to 10 (loudest)"}}, ["level"]),
    "find_books": _function(
        "find_books", "Search the library catalogue.",
        {"topic": _string("What the books are about"),
         "max_results": {"type": "integer", "description": "At most this many books"},
         "available_only": {"type": "boolean", "description": "Only books that can be borrowed now"}}, ["topic"]),
    "book_tour": _function(
        "book_tour", "Book a guided tour.",
        {"visitor": {"type": "object", "description": "Who takes the tour", "properties": {
            "name": _string("First name"), "age": {"type": "integer", "description": "Age in years"}},
            "required": ["name", "age"]},
         "date": _string("Date, YYYY-MM-DD"),
         "languages": {"type": "array", "description": "Languages of the guide, in order of preference",
                       "items": {"type": "string"}},
         "wheelchair": {"type": "boolean", "description": "Whether wheelchair access is needed"}},
        ["visitor", "date", "languages"]),
    "set_reminder": _function(
        "set_reminder", "Remind the user of something later.",
        {"text": _string("What to remind of"), "minutes": {"type": "number", "description": "Minutes from now"},
         "repeat": {"type": "boolean", "description": "Repeat every that many minutes"},
         "sound": _string("Alert sound, or null for a silent reminder", nullable=True)},
        ["text", "minutes", "repeat", "sound"]),
    "convert_currency": _function(
        "convert_currency", "Convert an amount of money.",
        {"amount": {"type": "number", "description": "Amount to convert"},
         "source": _string("Currency code of the amount, e.g. EUR"), "target": _string("Currency code to convert to")},
        ["amount", "source", "target"]),
    "get_directions": _function(
        "get_directions", "Walking directions inside the building.",
        {"destination": _string("Where to go", enum=PLACES),
         "avoid_stairs": {"type": "boolean", "description": "Use lifts and ramps only"}}, ["destination"]),
    "translate": _function(
        "translate", "Translate a short phrase.",
        {"text": _string("The phrase"), "target_language": _string("Language to translate into", enum=LANGUAGES)},
        ["text", "target_language"]),
    "get_ticket_prices": _function(
        "get_ticket_prices", "Total ticket price for a group.",
        {"visitors": {"type": "array", "description": "The group, one entry per category", "items": {
            "type": "object", "properties": {"category": _string("Ticket category", enum=["adult", "child", "senior"]),
                                             "count": {"type": "integer", "description": "How many"}},
            "required": ["category", "count"]}}}, ["visitors"]),
}


@dataclass(frozen=True)
class Call:
    """One tool call a question asks for, with the response it gets and the sentence that answers with it."""

    name: str
    question: str
    arguments: dict
    response: dict
    answer: str


def _number(rng: random.Random) -> float | int:
    return rng.choice([rng.randint(1, 60), round(rng.uniform(0.5, 90), 1)])


def _weather(rng: random.Random) -> Call:
    city, temperature, condition = rng.choice(CITIES), rng.randint(-12, 34), rng.choice(CONDITIONS)
    arguments: dict = {"city": city}
    question = rng.choice([f"What is the weather in {city}?", f"How warm is it in {city}?",
                           f"Is it cold in {city} today?", f"What's the weather like in {city} right now?"])
    if rng.random() < 0.35:
        arguments["unit"] = unit = rng.choice(["celsius", "fahrenheit"])
        question = rng.choice([f"What is the temperature in {city} in {unit}?",
                               f"Tell me the weather in {city}, in {unit} please."])
    response = {"temperature": temperature, "condition": condition, "unit": arguments.get("unit", "celsius")}
    return Call("get_weather", question, arguments, response,
                f"It is {temperature} degrees and {condition} in {city}.")


def _opening_hours(rng: random.Random) -> Call:
    exhibit, opens, closes = rng.choice(EXHIBITS), f"{rng.randint(8, 11):02d}:00", f"{rng.randint(15, 20)}:30"
    arguments: dict = {"exhibit": exhibit}
    question = rng.choice([f"When does the {exhibit} open?", f"What are the opening hours of the {exhibit}?",
                           f"Is the {exhibit} open now?"])
    if rng.random() < 0.4:
        arguments["day"] = day = rng.choice(DAYS)
        question = rng.choice([f"When is the {exhibit} open on {day.title()}?",
                               f"What time does the {exhibit} close on {day.title()}?"])
    return Call("get_opening_hours", question, arguments, {"opens": opens, "closes": closes},
                f"The {exhibit} is open from {opens} to {closes}.")


def _volume(rng: random.Random) -> Call:
    level = rng.randint(0, 10)
    question = rng.choice([f"Set the volume to {level}.", f"Please change the volume to {level}.",
                           f"Volume {level}, please.", f"Can you put the sound at {level}?"])
    if level == 0 and rng.random() < 0.5:
        question = "Mute the sound, please."
    return Call("set_volume", question, {"level": level}, {"level": level, "ok": True}, f"The volume is now {level}.")


def _books(rng: random.Random) -> Call:
    topic, arguments = rng.choice(TOPICS), {}
    count = rng.randint(1, 5)
    question = rng.choice([f"Find books about {topic}.", f"Do you have books on {topic}?"])
    if rng.random() < 0.5:
        arguments["max_results"] = count
        question = rng.choice([f"Find {count} books about {topic}.", f"Show me at most {count} books on {topic}."])
    if rng.random() < 0.3:
        arguments["available_only"] = True
        question = question[:-1] + " that I can borrow today" + question[-1]
    titles = [f"{word} {topic.title()}" for word in rng.sample(TITLE_WORDS, count)]
    return Call("find_books", question, {"topic": topic, **arguments}, {"books": titles, "count": count},
                f"I found {count} book{'s' if count > 1 else ''}: {', '.join(titles)}.")


def _tour(rng: random.Random) -> Call:
    name, age, date = rng.choice(NAMES), rng.randint(6, 90), f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    languages = rng.sample(LANGUAGES, rng.randint(1, 2))
    wheelchair = rng.random() < 0.3
    question = (f"Book a tour for {name}, who is {age}, on {date}, in {' or '.join(lang.title() for lang in languages)}."
                + (" We need wheelchair access." if wheelchair else ""))
    booking, time = f"T-{rng.randint(1000, 9999)}", f"{rng.randint(9, 16)}:{rng.choice(['00', '30'])}"
    arguments = {"visitor": {"name": name, "age": age}, "date": date, "languages": languages}
    if wheelchair or rng.random() < 0.5:
        arguments["wheelchair"] = wheelchair
    return Call("book_tour", question, arguments, {"booking": booking, "time": time, "confirmed": True},
                f"The tour for {name} is booked on {date} at {time}, reference {booking}.")


def _reminder(rng: random.Random) -> Call:
    task, minutes = rng.choice(TASKS), rng.choice([rng.randint(1, 90), rng.choice([0.5, 1.5, 2.5, 7.5])])
    repeat, sound = rng.random() < 0.3, rng.choice([None, None, *SOUNDS])
    question = (f"Remind me {'every' if repeat else 'in'} {minutes} minutes to {task}"
                + (f", with a {sound}." if sound else rng.choice([", silently.", "."])))
    return Call("set_reminder", question, {"text": task, "minutes": minutes, "repeat": repeat, "sound": sound},
                {"id": rng.randint(1, 99), "scheduled": True},
                f"I will remind you to {task} {'every' if repeat else 'in'} {minutes} minutes.")


def _currency(rng: random.Random) -> Call:
    (source_word, source), (target_word, target) = rng.sample(sorted(CURRENCIES.items()), 2)
    amount = _number(rng)
    converted = round(amount * rng.uniform(0.5, 2.0), 2)
    question = rng.choice([f"How much is {amount} {source_word} in {target_word}?",
                           f"Convert {amount} {source_word} to {target_word}."])
    return Call("convert_currency", question, {"amount": amount, "source": source, "target": target},
                {"amount": converted, "currency": target}, f"{amount} {source} is {converted} {target}.")


def _directions(rng: random.Random) -> Call:
    place, avoid = rng.choice(PLACES), rng.random() < 0.4
    question = rng.choice([f"How do I get to the {place}?", f"Where is the {place}?"])
    arguments: dict = {"destination": place}
    if avoid:
        question = f"How do I get to the {place} without stairs?"
        arguments["avoid_stairs"] = True
    steps, minutes = rng.sample(STEPS, 2), rng.randint(1, 6)
    return Call("get_directions", question, arguments, {"steps": steps, "minutes": minutes},
                f"{steps[0]}, then {steps[1][0].lower() + steps[1][1:]}. It takes about {minutes} minutes.")


def _translate(rng: random.Random) -> Call:
    phrase, language = rng.choice(sorted(PHRASES)), rng.choice(LANGUAGES[1:])
    translation = PHRASES[phrase][language]
    question = rng.choice([f"Translate '{phrase}' into {language.title()}.",
                           f"How do you say '{phrase}' in {language.title()}?"])
    return Call("translate", question, {"text": phrase, "target_language": language},
                {"translation": translation}, f"In {language.title()}, '{phrase}' is '{translation}'.")


def _tickets(rng: random.Random) -> Call:
    categories = rng.sample(["adult", "child", "senior"], rng.randint(1, 2))
    group = [{"category": c, "count": rng.randint(1, 4)} for c in categories]
    words = [f"{g['count']} {g['category']}{'s' if g['count'] > 1 else ''}" for g in group]
    total = round(sum(g["count"] * rng.choice([6.5, 9, 12.5, 15]) for g in group), 2)
    question = rng.choice([f"How much are tickets for {' and '.join(words)}?",
                           f"What do {' and '.join(words)} pay to get in?"])
    return Call("get_ticket_prices", question, {"visitors": group}, {"total": total, "currency": "EUR"},
                f"Tickets for {' and '.join(words)} cost {total} EUR in total.")


CALLS: dict[str, Callable[[random.Random], Call]] = {
    "get_weather": _weather, "get_opening_hours": _opening_hours, "set_volume": _volume, "find_books": _books,
    "book_tour": _tour, "set_reminder": _reminder, "convert_currency": _currency, "get_directions": _directions,
    "translate": _translate, "get_ticket_prices": _tickets,
}
assert CALLS.keys() == TOOLS.keys()


@dataclass
class Exchange:
    """A user message and the assistant messages (and tool messages) that answer it."""

    messages: list[dict]
    tools: list[str]
    thought: str


def _tool_exchange(rng: random.Random, index: str) -> Exchange:
    """One or two calls (two of one tool, or two tools), their responses, and the answer that uses them."""
    first = rng.choice(sorted(CALLS))
    calls = [CALLS[first](rng)]
    if rng.random() < 0.25:
        second = first if rng.random() < 0.5 else rng.choice(sorted(set(CALLS) - {first}))
        calls.append(CALLS[second](rng))
        if calls[1].arguments == calls[0].arguments:
            calls.pop()
    question = " ".join(c.question for c in calls)
    ids = [f"call_{index}_{i}" for i in range(len(calls))]
    tool_calls = [{"id": i, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                  for i, c in zip(ids, calls)]
    answer = " ".join(c.answer for c in calls)
    names = " and ".join(sorted({c.name for c in calls}))
    if rng.random() < 0.7:  # OpenAI's tool messages (a JSON string each) ...
        messages = [{"role": "user", "content": question}, {"role": "assistant", "tool_calls": tool_calls},
                    *({"role": "tool", "tool_call_id": i, "content": json.dumps(c.response)} for i, c in zip(ids, calls)),
                    {"role": "assistant", "content": answer}]
    else:  # ... or Gemma's own tool_responses, objects the template writes out key by key
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "tool_calls": tool_calls,
                     "tool_responses": [{"name": c.name, "response": c.response} for c in calls]},
                    {"role": "assistant", "content": answer}]
    return Exchange(messages, [c.name for c in calls], f"The user asks for something {names} can do. I will call it.")


def _json_exchange(rng: random.Random, topics: dict[str, list[str]]) -> Exchange:
    """A request for JSON answered with one JSON object (keys, strings, numbers, booleans, null, arrays, nesting)."""
    kind = rng.randrange(6)
    if kind == 0:
        exhibit = rng.choice(EXHIBITS)
        obj = {"name": exhibit, "floor": rng.randint(0, 3), "open": rng.random() < 0.7,
               "guide": rng.choice([None, rng.choice(NAMES)])}
        question = f"Describe the {exhibit} as a JSON object with name, floor, open and guide."
    elif kind == 1:
        name, age, city = rng.choice(NAMES), rng.randint(5, 90), rng.choice(CITIES)
        obj = {"name": name, "age": age, "city": city}
        question = f"{name} is {age} and lives in {city}. {rng.choice(JSON_ASKS)}"
    elif kind == 2:
        category = rng.choice(sorted(CATEGORIES))
        count = rng.randint(2, 4)
        obj = {"category": category, "items": rng.sample(CATEGORIES[category], count)}
        question = f"List {count} {category}. {rng.choice(JSON_ASKS)}"
    elif kind == 3:
        city = rng.choice(CITIES)
        obj = {"city": city, "temperature": rng.randint(-12, 34), "condition": rng.choice(CONDITIONS)}
        question = f"{rng.choice(JSON_ASKS)} What is the weather in {city}?"
    elif kind == 4:
        topic = rng.choice(sorted(topics))
        obj = {"topic": topic, "summary": _first_sentence(rng.choice(topics[topic]))}
        question = f"Summarize {topic} in JSON with a topic and a summary."
    else:
        name = rng.choice(NAMES)
        obj = {"visitor": {"name": name, "age": rng.randint(6, 90)}, "stops": rng.sample(EXHIBITS, rng.randint(1, 3)),
               "minutes": rng.choice([30, 45, 60, 90]), "price": rng.choice([0, 7.5, 12.5])}
        question = f"Plan a museum visit for {name}. {rng.choice(JSON_ASKS)}"
    reply = json.dumps(obj, indent=2 if rng.random() < 0.2 else None)
    keys = ", ".join(obj)
    return Exchange([{"role": "user", "content": question}, {"role": "assistant", "content": reply}], [],
                    f"The user wants JSON. I will reply with one object with the keys {keys}.")


def _first_sentence(paragraph: str) -> str:
    end = paragraph.find(". ")
    return " ".join((paragraph if end < 0 else paragraph[:end + 1]).split())


def _topic_exchange(rng: random.Random, topics: dict[str, list[str]]) -> Exchange:
    """A question about a pydoc topic answered with one of its paragraphs."""
    topic = rng.choice(sorted(topics))
    question = rng.choice([f"What is {topic}?", f"Explain {topic} in Python.", f"Tell me about {topic}.",
                           f"How does {topic} work?", f"Can you describe {topic}?"])
    return Exchange([{"role": "user", "content": question},
                     {"role": "assistant", "content": rng.choice(topics[topic])}], [],
                    f"The user asks about {topic}. I will explain it.")


def prose_paragraphs(text: str, low: int = 80, high: int = 600) -> list[str]:
    """The paragraphs of a pydoc topic that read as prose: not code, grammar or tables, and of a reply's length."""
    paragraphs = [p.strip("\n") for p in text.split("\n\n")]
    return [p for p in paragraphs if low <= len(p) <= high and not p.startswith((" ", "*", "-", "=", "+"))
            and "::=" not in p and p[0].isupper()]


def conversation(rng: random.Random, topics: dict[str, list[str]], index: int) -> tuple[list[dict], list[dict], bool]:
    """(messages, tools, enable_thinking) of one conversation: one to three exchanges of tool use, JSON or a
    topic question, sometimes under a system prompt, with tools declared whenever one is used (and sometimes
    when none is), and with thinking switched on for some of one exchange. Not for longer ones: the template keeps
    the thought of the last turn only, and turns after the first with and without thoughts taught this small model
    to open a thought channel in any later turn, thinking or not."""
    turns = rng.choices([1, 2, 3], weights=[75, 18, 7])[0]
    makers = [lambda k: _tool_exchange(rng, f"{index}_{k}"), lambda _: _json_exchange(rng, topics),
              lambda _: _topic_exchange(rng, topics)]
    exchanges = [rng.choices(makers, weights=[50, 28, 22])[0](k) for k in range(turns)]
    used = [name for e in exchanges for name in e.tools]
    declared = sorted(set(used) | set(rng.sample(sorted(TOOLS), rng.choice([0, 0, 1, 2]))))
    rng.shuffle(declared)
    if not used and rng.random() < 0.7:
        declared = []
    thinking = rng.random() < 0.3 and turns == 1
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    for exchange in exchanges:
        messages += exchange.messages
    if thinking:  # the template renders the thoughts of the last exchange only, as it does for real models
        for message in exchanges[-1].messages:
            if message["role"] == "assistant":
                first = "tool_calls" in message
                message["reasoning_content"] = exchange_thought(exchanges[-1], first)
    return messages, [TOOLS[name] for name in declared], thinking


def exchange_thought(exchange: Exchange, before_call: bool) -> str:
    """The short thought before an assistant message: why it calls, or that it now answers with what it got."""
    if exchange.tools and not before_call:
        return "I have the result. I will answer with it."
    return exchange.thought


def render_conversations(seed: int, topic_texts: dict[str, str], render: Callable[..., str],
                         count_tokens: Callable[[str], int], token_budget: int, max_tokens: int) -> list[str]:
    """Rendered conversations of at most `max_tokens` tokens each, in order, until they hold `token_budget` tokens.

    `render(messages, tools=..., enable_thinking=...)` is the template through transformers; `topic_texts` maps
    pydoc topic names to their training text (never held-out text).
    """
    topics = {name.replace("-", " "): paras for name, text in sorted(topic_texts.items())
              if (paras := prose_paragraphs(text))}
    rng = random.Random(seed)
    docs, total = [], 0
    while total < token_budget:
        messages, tools, thinking = conversation(rng, topics, len(docs))
        text = render(messages, tools=tools or None, enable_thinking=thinking)
        n = count_tokens(text)
        if n <= max_tokens:
            docs.append(text)
            total += n
    return docs
