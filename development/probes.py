"""General prompts shipped with whetstone, the guard against forgetting.

Three disjoint sets, so no measurement is taken on what was trained on:

    REPLAY      the base model answers these once; the answers are mixed into training so
                the adapter keeps sounding like the base model on everything else.
    VALIDATION  base answers used as held-out loss during training (early stopping).
    REGRESSION  base answers scored by the gate: per-token NLL drift from the base.

FACT_PROBES are questions the embedded base model answers right (measured greedily on
SmolLM2-135M-Instruct); a candidate that loses them has overwritten general knowledge, which
is exactly what naive training on corrections did (shared notes, "Learning is easy").
"""

from __future__ import annotations

REPLAY: tuple[str, ...] = (
    "What is the capital of Germany?",
    "Explain what photosynthesis is in two sentences.",
    "Give me three tips for sleeping better.",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn leaves.",
    "How do I boil an egg?",
    "What does a computer's CPU do?",
    "Name three primary colors.",
    "Why do we have seasons on Earth?",
    "What is a noun? Give an example.",
    "Suggest a name for a friendly cat.",
    "How many hours are in a day?",
    "What is the main ingredient of guacamole?",
    "Summarize the story of Cinderella in one sentence.",
    "What is gravity?",
    "How can I stay focused while studying?",
    "Translate 'thank you' into Spanish.",
    "What is the largest ocean on Earth?",
    "Write a short thank-you note to a teacher.",
    "What are the three states of matter?",
    "Why is exercise good for your health?",
    "What is the square root of 16?",
    "Describe a rainbow to a child.",
    "What is the capital of Spain?",
    "How does a bicycle work?",
    "Give me a simple recipe for a salad.",
    "What is the sun made of?",
    "How do bees make honey?",
    "What is a verb?",
    "List four fruits that are red.",
    "What does a doctor do?",
    "Why do leaves change color in the fall?",
    "What is the speed of light, roughly?",
    "Write one sentence about the ocean.",
    "What is 10 times 10?",
    "How do you say hello in French?",
    "What is the purpose of a map?",
    "Name a famous painting.",
    "What animals live in the Arctic?",
    "How can I save money each month?",
    "What is the moon?",
    "Explain what a recipe is.",
    "What is the tallest animal?",
    "What do plants need to grow?",
    "Why is the ocean salty?",
    "Give me a word that rhymes with cat.",
    "What is the job of the heart?",
    "How many minutes are in an hour?",
)

VALIDATION: tuple[str, ...] = (
    "What is the capital of Canada?",
    "Explain what a cloud is.",
    "Give me two ideas for a rainy afternoon.",
    "What is an adjective?",
    "How do fish breathe?",
    "Write a sentence about a sunny morning.",
    "What is the largest desert in the world?",
    "How many seconds are in a minute?",
)

REGRESSION: tuple[str, ...] = (
    "What is the capital of England?",
    "Explain what an ecosystem is.",
    "Give me three ways to reduce stress.",
    "What is a triangle?",
    "How do airplanes fly?",
    "Write a short poem about the sea.",
    "What is the difference between a lake and a river?",
    "Why do we need to drink water?",
    "What is electricity?",
    "Name three musical instruments.",
    "How do volcanoes form?",
    "What is a good way to start the day?",
)

# (question, accepted answers): right if the answer contains any of them (case-insensitive).
FACT_PROBES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("paris",)),
    ("How many days are in a week?", ("7", "seven")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the boiling point of water in Celsius?", ("100",)),
    ("What is 2 + 2?", ("4", "four")),
    ("What is the chemical symbol for water?", ("h2o",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("How many legs does a spider have?", ("8", "eight")),
    ("What is the opposite of hot?", ("cold",)),
    ("What language is spoken in Brazil?", ("portuguese",)),
    ("How many continents are there?", ("7", "seven")),
    ("What is the tallest mountain in the world?", ("everest",)),
    ("What is the capital of Russia?", ("moscow",)),
    ("What is the capital of Egypt?", ("cairo",)),
    ("What is the capital of China?", ("beijing",)),
    ("What is the capital of Australia?", ("canberra",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("How many sides does a triangle have?", ("3", "three")),
    ("How many legs does a dog have?", ("4", "four")),
    ("What is the opposite of day?", ("night",)),
    ("What is 3 + 3?", ("6", "six")),
    ("What is the main language spoken in France?", ("french",)),
    ("What language is spoken in Spain?", ("spanish",)),
    ("What is the currency of Japan?", ("yen",)),
    ("What is the largest mammal?", ("whale",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
)


def fact_is_right(answer: str, accepted: tuple[str, ...]) -> bool:
    text = answer.lower()
    return any(word in text for word in accepted)
