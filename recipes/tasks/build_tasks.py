"""Generate cornerstone's bundled offline tasks (deterministic: the same files on every run).

    python recipes/tasks/build_tasks.py

Every item is a four-choice question with one correct answer drawn from the hand-checked facts
below; the three distractors come from the same category, chosen with a fixed seed. Only facts that
are well known and undisputed are used (no capitals that are contested or split between cities).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
CHOICES = 4

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "the United Kingdom": "London", "Ireland": "Dublin", "Belgium": "Brussels", "Austria": "Vienna",
    "Denmark": "Copenhagen", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Iceland": "Reykjavik", "Poland": "Warsaw", "the Czech Republic": "Prague", "Hungary": "Budapest",
    "Greece": "Athens", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Russia": "Moscow", "Ukraine": "Kyiv", "Turkey": "Ankara", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Ghana": "Accra", "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Algeria": "Algiers",
    "Tunisia": "Tunis", "Senegal": "Dakar", "Japan": "Tokyo", "China": "Beijing", "South Korea": "Seoul",
    "North Korea": "Pyongyang", "India": "New Delhi", "Pakistan": "Islamabad", "Bangladesh": "Dhaka",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "the Philippines": "Manila", "Malaysia": "Kuala Lumpur",
    "Nepal": "Kathmandu", "Afghanistan": "Kabul", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh",
    "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman", "Qatar": "Doha", "Australia": "Canberra",
    "New Zealand": "Wellington", "Canada": "Ottawa", "the United States": "Washington, D.C.",
    "Mexico": "Mexico City", "Cuba": "Havana", "Argentina": "Buenos Aires", "Brazil": "Brasilia",
    "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogota", "Venezuela": "Caracas", "Ecuador": "Quito",
    "Uruguay": "Montevideo", "Paraguay": "Asuncion", "Mongolia": "Ulaanbaatar", "Kazakhstan": "Astana",
    "Uzbekistan": "Tashkent", "Georgia": "Tbilisi", "Armenia": "Yerevan", "Azerbaijan": "Baku",
    "Belarus": "Minsk", "Lithuania": "Vilnius", "Latvia": "Riga", "Estonia": "Tallinn", "Slovakia": "Bratislava",
    "Slovenia": "Ljubljana", "Albania": "Tirana", "Cyprus": "Nicosia", "Malta": "Valletta", "Jamaica": "Kingston",
    "Panama": "Panama City", "Costa Rica": "San Jose", "Guatemala": "Guatemala City", "Honduras": "Tegucigalpa",
    "Nicaragua": "Managua", "El Salvador": "San Salvador", "the Dominican Republic": "Santo Domingo",
    "Haiti": "Port-au-Prince", "Libya": "Tripoli", "Zimbabwe": "Harare", "Zambia": "Lusaka",
    "Uganda": "Kampala", "Rwanda": "Kigali", "Angola": "Luanda", "Mozambique": "Maputo",
    "Madagascar": "Antananarivo", "Namibia": "Windhoek", "Botswana": "Gaborone", "Mali": "Bamako",
    "Cambodia": "Phnom Penh", "Laos": "Vientiane", "Oman": "Muscat", "Kuwait": "Kuwait City",
    "the United Arab Emirates": "Abu Dhabi", "Bahrain": "Manama", "Kyrgyzstan": "Bishkek", "Tajikistan": "Dushanbe",
    "Turkmenistan": "Ashgabat", "Bosnia and Herzegovina": "Sarajevo", "North Macedonia": "Skopje",
    "Montenegro": "Podgorica", "Fiji": "Suva",
}

CATEGORIES = {
    # no fruit that is also a colour name (orange, peach, plum, ...) or an animal (kiwi)
    "fruit": ["apple", "banana", "melon", "grape", "pear", "guava", "papaya", "mango", "coconut", "fig",
              "strawberry", "pineapple", "watermelon", "pomegranate", "blueberry"],
    "animal": ["dog", "cat", "horse", "cow", "lion", "tiger", "elephant", "rabbit", "sheep", "wolf",
               "bear", "monkey", "giraffe", "zebra", "fox"],
    "vehicle": ["car", "bus", "truck", "bicycle", "train", "airplane", "motorcycle", "boat", "ship",
                "tractor", "helicopter", "van", "taxi", "scooter", "submarine"],
    "colour": ["red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "grey",
               "violet", "turquoise", "beige", "crimson", "magenta"],
    "instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp",
                           "saxophone", "clarinet", "trombone", "banjo", "accordion", "harmonica", "tuba"],
    "body part": ["hand", "foot", "arm", "leg", "head", "nose", "ear", "eye", "mouth", "knee",
                         "elbow", "shoulder", "finger", "toe", "neck"],
    "clothing": ["shirt", "jacket", "coat", "dress", "skirt", "sock", "scarf", "sweater",
                          "hat", "glove", "tie", "blouse", "vest", "apron", "boot"],
    "tool": ["hammer", "screwdriver", "wrench", "saw", "drill", "chisel", "pliers", "shovel", "rake",
             "axe", "pickaxe", "trowel", "spanner", "crowbar", "mallet"],
}

ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"), ("happy", "sad"),
    ("open", "closed"), ("wet", "dry"), ("young", "old"), ("rich", "poor"), ("early", "late"), ("full", "empty"),
    ("hard", "soft"), ("high", "low"), ("long", "short"), ("loud", "quiet"), ("strong", "weak"),
    ("thick", "thin"), ("heavy", "light"), ("clean", "dirty"), ("true", "false"), ("win", "lose"),
    ("buy", "sell"), ("push", "pull"), ("above", "below"), ("inside", "outside"), ("love", "hate"),
    ("friend", "enemy"), ("begin", "end"), ("arrive", "leave"), ("remember", "forget"), ("accept", "refuse"),
    ("question", "answer"), ("north", "south"), ("east", "west"), ("left", "right"), ("first", "last"),
    ("always", "never"), ("everything", "nothing"), ("morning", "evening"), ("summer", "winter"),
    ("sweet", "sour"), ("brave", "cowardly"), ("polite", "rude"), ("safe", "dangerous"), ("wide", "narrow"),
    ("deep", "shallow"), ("cheap", "expensive"), ("easy", "difficult"), ("asleep", "awake"),
    ("alive", "dead"), ("increase", "decrease"), ("maximum", "minimum"), ("before", "after"), ("give", "take"),
    ("laugh", "cry"), ("smooth", "rough"), ("tight", "loose"), ("sharp", "blunt"), ("import", "export"),
]


def _options(answer: str, pool: list[str], rng: random.Random) -> tuple[list[str], int]:
    distractors = rng.sample(sorted(set(pool) - {answer}), CHOICES - 1)
    label = rng.randrange(CHOICES)
    return distractors[:label] + [answer] + distractors[label:], label


def capitals(rng: random.Random) -> list[dict]:
    cities = list(CAPITALS.values())
    items = []
    for country, capital in CAPITALS.items():
        choices, label = _options(capital, cities, rng)
        items.append({"question": f"What is the capital city of {country}?", "choices": choices, "label": label})
    return items


def categories(rng: random.Random) -> list[dict]:
    kinds = list(CATEGORIES)
    items = []
    for kind, members in CATEGORIES.items():
        for member in members:
            choices, label = _options(kind, kinds, rng)
            # colours are adjectives/mass nouns ("red"), everything else takes an article ("a banana")
            thing = member if kind == "colour" else ("an " if member[0] in "aeiou" else "a ") + member
            items.append({"question": f"What kind of thing is {thing}?", "choices": choices, "label": label})
    return items


# words that are (near-)opposites across pairs ("hard" is the opposite of both "soft" and "easy"):
# a distractor never comes from the same group as the asked word, so no distractor is also right
ANTONYM_GROUPS = [
    {"hard", "soft", "easy", "difficult", "loud", "quiet", "smooth", "rough", "sharp", "blunt"},
    {"up", "down", "above", "below", "high", "low", "inside", "outside", "deep", "shallow"},
    {"begin", "end", "first", "last", "early", "late", "before", "after", "arrive", "leave", "always", "never"},
    {"day", "night", "morning", "evening", "summer", "winter"},
    {"true", "false", "right", "left", "question", "answer"},
    {"wet", "dry", "sweet", "sour", "hot", "cold"},
    {"heavy", "light", "thick", "thin", "wide", "narrow", "big", "small", "long", "short", "full", "empty",
     "tight", "loose", "maximum", "minimum", "increase", "decrease"},
    {"alive", "dead", "asleep", "awake", "young", "old"},
    {"win", "lose", "buy", "sell", "give", "take", "push", "pull", "import", "export", "accept", "refuse"},
    {"rich", "poor", "cheap", "expensive"},
    {"happy", "sad", "laugh", "cry", "love", "hate", "friend", "enemy"},
]


def antonyms(rng: random.Random) -> list[dict]:
    words = [word for pair in ANTONYMS for word in pair]
    items = []
    for first, second in ANTONYMS:
        for word, opposite in ((first, second), (second, first)):
            related = set().union(*(group for group in ANTONYM_GROUPS if word in group), {word, opposite})
            choices, label = _options(opposite, [w for w in words if w not in related], rng)
            items.append({"question": f"What is the opposite of \"{word}\"?", "choices": choices, "label": label})
    return items


def arithmetic(rng: random.Random) -> list[dict]:
    items = []
    for a, b in ((a, b) for a in range(1, 10) for b in range(1, 10)):
        answer = a + b
        # distractors are other sums of two digits, so no option is impossible on its face
        pool = [str(n) for n in range(2, 19) if n != answer]
        choices, label = _options(str(answer), pool, rng)
        items.append({"question": f"What is {a} + {b}?", "choices": choices, "label": label})
    return items


TASKS = {"cs_capitals": capitals, "cs_categories": categories, "cs_antonyms": antonyms, "cs_arithmetic": arithmetic}


def main() -> None:
    (HERE / "data").mkdir(exist_ok=True)
    for index, (name, build) in enumerate(TASKS.items()):
        items = build(random.Random(1000 + index))
        path = HERE / "data" / f"{name}.jsonl"
        path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
        print(f"{name}: {len(items)} items -> {path.relative_to(HERE)}")


if __name__ == "__main__":
    main()
