"""General prompts shipped with whetstone, the guard against forgetting.

Three disjoint sets, so no measurement is taken on what was trained on:

    REPLAY      the base model answers these once; the answers are mixed into training so
                the adapter keeps sounding like the base model on everything else.
    VALIDATION  base answers used as held-out loss during training (early stopping).
    REGRESSION  base answers scored by the gate: per-token NLL drift from the base.

FACT_PROBES are multiple-choice questions the embedded base model gets right (by likelihood, on
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

# (question, answer sentence with {} for the option, right option, wrong options): multiple
# choice scored by likelihood, the way lm-evaluation-harness measures knowledge. The model
# "knows" the fact when the sentence with the right option is its likeliest (total log p).
# Greedy generation was measured first and is too brittle for this: training on nothing but
# the base model's own answers (benchmarks.learning --control) flipped 5 of 26 generated
# answers into rambling, which says nothing about what the model knows.
FACT_PROBES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "What is the capital of France?",
        "The capital of France is {}.",
        "Paris",
        ("London", "Rome", "Madrid"),
    ),
    (
        "How many days are in a week?",
        "There are {} days in a week.",
        "seven",
        ("five", "ten", "twelve"),
    ),
    (
        "What color is the sky on a clear day?",
        "The sky on a clear day is {}.",
        "blue",
        ("green", "red", "purple"),
    ),
    (
        "What is the boiling point of water in Celsius?",
        "Water boils at {} degrees Celsius.",
        "100",
        ("50", "10", "500"),
    ),
    ("What is 2 + 2?", "2 + 2 = {}", "4", ("5", "3", "22")),
    (
        "What is the chemical symbol for water?",
        "The chemical symbol for water is {}.",
        "H2O",
        ("CO2", "NaCl", "O3"),
    ),
    (
        "What is the capital of Japan?",
        "The capital of Japan is {}.",
        "Tokyo",
        ("Beijing", "Seoul", "Bangkok"),
    ),
    ("How many legs does a spider have?", "A spider has {} legs.", "eight", ("six", "four", "ten")),
    (
        "What is the opposite of hot?",
        "The opposite of hot is {}.",
        "cold",
        ("warm", "loud", "tall"),
    ),
    (
        "What language is spoken in Brazil?",
        "The language spoken in Brazil is {}.",
        "Portuguese",
        ("Spanish", "French", "German"),
    ),
    (
        "How many continents are there?",
        "There are {} continents.",
        "seven",
        ("three", "twelve", "twenty"),
    ),
    (
        "What is the tallest mountain in the world?",
        "The tallest mountain in the world is {}.",
        "Mount Everest",
        ("Mont Blanc", "Mount Fuji", "Kilimanjaro"),
    ),
    (
        "What is the capital of Russia?",
        "The capital of Russia is {}.",
        "Moscow",
        ("Warsaw", "Kyiv", "Oslo"),
    ),
    (
        "What is the capital of Egypt?",
        "The capital of Egypt is {}.",
        "Cairo",
        ("Nairobi", "Tunis", "Baghdad"),
    ),
    (
        "What is the capital of China?",
        "The capital of China is {}.",
        "Beijing",
        ("Tokyo", "Hanoi", "Seoul"),
    ),
    (
        "Which planet is known as the Red Planet?",
        "The Red Planet is {}.",
        "Mars",
        ("Venus", "Jupiter", "Saturn"),
    ),
    (
        "How many sides does a triangle have?",
        "A triangle has {} sides.",
        "three",
        ("four", "five", "six"),
    ),
    ("How many legs does a dog have?", "A dog has {} legs.", "four", ("two", "six", "eight")),
    (
        "What is the opposite of day?",
        "The opposite of day is {}.",
        "night",
        ("morning", "noon", "week"),
    ),
    ("What is 3 + 3?", "3 + 3 = {}", "6", ("7", "9", "33")),
    (
        "What is the main language spoken in France?",
        "The main language spoken in France is {}.",
        "French",
        ("English", "German", "Italian"),
    ),
    (
        "What language is spoken in Spain?",
        "The language spoken in Spain is {}.",
        "Spanish",
        ("Portuguese", "Italian", "Dutch"),
    ),
    (
        "What is the currency of Japan?",
        "The currency of Japan is the {}.",
        "yen",
        ("euro", "dollar", "peso"),
    ),
    (
        "What is the opposite of big?",
        "The opposite of big is {}.",
        "small",
        ("tall", "loud", "fast"),
    ),
    (
        "Who wrote Romeo and Juliet?",
        "Romeo and Juliet was written by {}.",
        "William Shakespeare",
        ("Charles Dickens", "Mark Twain", "Jane Austen"),
    ),
    ("What do bees make?", "Bees make {}.", "honey", ("milk", "silk", "paper")),
)
