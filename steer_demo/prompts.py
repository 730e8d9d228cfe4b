"""Chat prompts for the self-generated part of the demo corpus.

Topic variety matters more than anything else here: the SAE can only learn concepts that occur in
its training text. The Golden Gate Bridge / bridges / San Francisco block is deliberately large (and
sampled several times) so that the SAE learns a clear bridge feature for the "Golden Gate" clamp demo.
"""

from __future__ import annotations

#: (topic, prompt) pairs. Topic names are recorded with each generated document.
BRIDGE_PROMPTS: list[str] = [
    "Tell me about the Golden Gate Bridge.",
    "Describe the Golden Gate Bridge in San Francisco at sunset.",
    "Why is the Golden Gate Bridge painted orange?",
    "How was the Golden Gate Bridge built, and who designed it?",
    "Write a short story about a walk across the Golden Gate Bridge in the fog.",
    "What is a suspension bridge and how does it carry its load?",
    "Compare the Golden Gate Bridge with the Brooklyn Bridge.",
    "Write a poem about a great red bridge over a foggy bay.",
    "What are the most famous bridges in the world?",
    "Give me tips for visiting San Francisco: the Golden Gate Bridge, Alcatraz and the cable cars.",
    "Explain how engineers inspect and maintain a large steel bridge.",
    "Describe the view of the Golden Gate from the Marin Headlands.",
    "What is the history of the San Francisco Bay and its bridges?",
    "Describe the Golden Gate Bridge from the point of view of the bridge itself.",
    "How long is the Golden Gate Bridge and how tall are its towers?",
    "Write a travel blog paragraph about cycling over the Golden Gate Bridge.",
]

OTHER_PROMPTS: list[tuple[str, str]] = [
    # cooking / food
    ("cooking", "How do I bake a loaf of sourdough bread?"),
    ("cooking", "Give me a simple recipe for tomato soup."),
    ("cooking", "What spices are used in Indian curry?"),
    ("cooking", "How do you make fresh pasta at home?"),
    ("cooking", "Explain how to cook a perfect steak."),
    ("cooking", "What is the difference between baking soda and baking powder?"),
    # sports
    ("sports", "Describe an exciting moment in a football match."),
    ("sports", "Explain the rules of basketball."),
    ("sports", "How should a beginner train for a marathon?"),
    ("sports", "Who are some of the greatest tennis players of all time?"),
    ("sports", "What is the Tour de France?"),
    # space / astronomy
    ("space", "Explain black holes in simple terms."),
    ("space", "What is it like to live on the International Space Station?"),
    ("space", "Describe the planets of our solar system."),
    ("space", "How did the Apollo 11 mission land on the Moon?"),
    ("space", "What is a galaxy and how many stars does it contain?"),
    ("space", "Could humans live on Mars one day?"),
    # oceans / nature
    ("ocean", "Describe life in the deep ocean."),
    ("ocean", "Why are coral reefs important?"),
    ("ocean", "What causes ocean tides?"),
    ("ocean", "Tell me about whales and how they communicate."),
    ("nature", "Describe a walk through an old forest in autumn."),
    ("nature", "How do volcanoes form?"),
    ("nature", "What makes mountains so high?"),
    # music / art
    ("music", "Explain how a piano produces sound."),
    ("music", "Who was Ludwig van Beethoven?"),
    ("music", "Describe the history of jazz music."),
    ("music", "How do I learn to play the guitar?"),
    ("art", "What is impressionism in painting?"),
    ("art", "Describe the Mona Lisa."),
    # medicine / health
    ("medicine", "How do vaccines work?"),
    ("medicine", "What are the symptoms of the flu?"),
    ("medicine", "Explain how the human heart pumps blood."),
    ("medicine", "Why is sleep important for health?"),
    ("medicine", "What does a nurse do in a hospital?"),
    # law / politics
    ("law", "What is the difference between civil law and criminal law?"),
    ("law", "Explain what a contract is."),
    ("law", "What does a judge do in a trial?"),
    ("law", "What is copyright and how long does it last?"),
    ("politics", "How does an election work in a democracy?"),
    # history
    ("history", "Tell me about the Roman Empire."),
    ("history", "What caused the First World War?"),
    ("history", "Describe the building of the pyramids in ancient Egypt."),
    ("history", "Who was Napoleon Bonaparte?"),
    ("history", "What was the Industrial Revolution?"),
    ("history", "Describe life in a medieval castle."),
    # programming / computers
    ("programming", "What is a Python decorator?"),
    ("programming", "Write a Python function that reverses a string."),
    ("programming", "Explain recursion with an example."),
    ("programming", "What is the difference between a list and a tuple in Python?"),
    ("programming", "How does a hash table work?"),
    ("programming", "Write a SQL query that counts orders per customer."),
    ("programming", "What is Git and why do programmers use it?"),
    ("computers", "How does the internet work?"),
    ("computers", "What is machine learning?"),
    # weather / climate
    ("weather", "What causes thunderstorms?"),
    ("weather", "How do meteorologists forecast the weather?"),
    ("weather", "Describe a snowy winter day."),
    ("weather", "What is a hurricane?"),
    ("climate", "What is climate change?"),
    # animals
    ("animals", "Tell me about elephants."),
    ("animals", "Why do cats purr?"),
    ("animals", "How do bees make honey?"),
    ("animals", "Describe the life of a penguin in Antarctica."),
    ("animals", "What should I know before adopting a dog?"),
    ("animals", "How do birds migrate?"),
    # finance / economy
    ("finance", "What is a stock market?"),
    ("finance", "How does compound interest work?"),
    ("finance", "Give me tips for saving money each month."),
    ("finance", "What is inflation?"),
    ("finance", "Explain what a bank loan is."),
    # poetry / literature
    ("poetry", "Write a short poem about the ocean."),
    ("poetry", "Write a haiku about the moon."),
    ("poetry", "Write a poem about friendship."),
    ("literature", "Summarize the story of Romeo and Juliet."),
    ("literature", "Who was Jane Austen?"),
    ("literature", "Write the opening paragraph of a mystery novel."),
    # science
    ("science", "Explain photosynthesis."),
    ("science", "What is an atom made of?"),
    ("science", "How does electricity work?"),
    ("science", "What is DNA?"),
    ("science", "Explain Newton's laws of motion."),
    # travel / geography / cities
    ("travel", "What should I see in Paris?"),
    ("travel", "Describe a train journey through the Swiss Alps."),
    ("travel", "Tell me about Tokyo."),
    ("geography", "What is the longest river in the world?"),
    ("geography", "Describe the Sahara desert."),
    # everyday life / misc
    ("everyday", "How do I write a good cover letter for a job?"),
    ("everyday", "Give me tips for studying for an exam."),
    ("everyday", "How do I plant tomatoes in my garden?"),
    ("everyday", "What are good ways to reduce stress?"),
    ("transport", "How does a car engine work?"),
    ("transport", "How do airplanes fly?"),
    ("philosophy", "What is the meaning of happiness according to philosophers?"),
    ("emotions", "Write a letter to a friend who is feeling sad."),
    ("math", "Explain the Pythagorean theorem."),
    ("math", "What is a prime number?"),
    ("architecture", "Describe Gothic cathedrals."),
    ("architecture", "How are skyscrapers built?"),
]

#: How many answers to sample per prompt.
BRIDGE_SAMPLES = 3
OTHER_SAMPLES = 2


def chat_prompts() -> list[tuple[str, str]]:
    """All (topic, prompt) pairs to generate, in a fixed order (repeats = independent samples)."""
    out = [("bridge", p) for p in BRIDGE_PROMPTS for _ in range(BRIDGE_SAMPLES)]
    out += [tp for tp in OTHER_PROMPTS for _ in range(OTHER_SAMPLES)]
    return out
