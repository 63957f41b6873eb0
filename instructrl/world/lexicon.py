"""Word lists of the synthetic world: a small, plain vocabulary a tiny model can learn.

Invented names are built from a few syllables so that they are unknown to any real model and
their facts exist only in this world's knowledge base. Everything else is ordinary English.
"""

from __future__ import annotations

NAME_SYLLABLES_START = ("ba", "do", "ka", "li", "mo", "ne", "ra", "si", "to", "vu", "ze", "po")
NAME_SYLLABLES_END = ("lin", "ra", "mo", "vek", "na", "dor", "sa", "ti", "bel", "ko", "rin", "va")
PLACE_SUFFIXES = ("ton", "vale", "holm", "ford", "mere", "wick")

JOBS = ("baker", "farmer", "painter", "doctor", "teacher", "sailor", "miner", "singer", "tailor")
COLORS = ("red", "blue", "green", "yellow", "white", "black", "brown", "pink")
PETS = ("cat", "dog", "goat", "owl", "frog", "horse", "duck", "fox")
FOODS = ("bread", "soup", "apples", "fish", "rice", "cheese", "honey", "plums", "beans")
CLIMATES = ("sunny", "rainy", "snowy", "windy", "foggy")
LANDSCAPES = ("hills", "lakes", "forests", "rivers", "cliffs", "fields")
OBJECT_KINDS = ("lamp", "kettle", "drum", "boat", "bell", "cart", "flute", "chair", "clock")
MATERIALS = ("wood", "iron", "glass", "clay", "stone", "silver")
SIZES = ("small", "big")

# Categories for brainstorming: enough words per first letter to ask for several.
CATEGORY_WORDS = {
    "animals": (
        "bat",
        "bear",
        "bee",
        "bird",
        "bull",
        "cat",
        "cow",
        "crab",
        "crow",
        "deer",
        "dog",
        "duck",
        "fox",
        "frog",
        "goat",
        "goose",
        "hare",
        "hen",
        "horse",
        "mole",
        "moth",
        "mouse",
        "mule",
        "seal",
        "sheep",
        "snail",
        "snake",
        "swan",
        "toad",
        "wolf",
        "worm",
    ),
    "foods": (
        "bacon",
        "bagel",
        "bean",
        "beet",
        "berry",
        "bread",
        "bun",
        "butter",
        "cake",
        "candy",
        "carrot",
        "cheese",
        "corn",
        "cream",
        "fig",
        "fish",
        "honey",
        "jam",
        "lemon",
        "melon",
        "milk",
        "pasta",
        "peach",
        "pear",
        "pie",
        "plum",
        "rice",
        "salt",
        "soup",
        "stew",
    ),
    "tools": (
        "axe",
        "bell",
        "belt",
        "box",
        "brush",
        "bucket",
        "chisel",
        "clamp",
        "comb",
        "cup",
        "drill",
        "fork",
        "hammer",
        "hook",
        "knife",
        "ladder",
        "mop",
        "nail",
        "needle",
        "pan",
        "pen",
        "pot",
        "rake",
        "rope",
        "saw",
        "scale",
        "shovel",
        "spoon",
        "spade",
        "broom",
        "bolt",
    ),
}

# Plain words for rewrite / reverse tasks and for stories.
COMMON_WORDS = (
    "stone",
    "river",
    "pebble",
    "table",
    "garden",
    "window",
    "candle",
    "basket",
    "forest",
    "mirror",
    "pillow",
    "ladder",
    "button",
    "castle",
    "rabbit",
    "wagon",
    "bottle",
    "pepper",
    "hammer",
    "meadow",
    "lantern",
    "kitten",
    "feather",
    "puddle",
    "rocket",
    "ribbon",
    "tunnel",
)
ADJECTIVES = ("happy", "quiet", "brave", "kind", "tall", "clever", "gentle", "busy", "calm")
VERBS_PAST = ("walked", "sang", "laughed", "worked", "waited", "smiled", "cooked", "rested")

POSITIVE_WORDS = ("great", "lovely", "wonderful", "fresh", "friendly", "tasty", "nice", "clean")
NEGATIVE_WORDS = ("awful", "cold", "dirty", "slow", "rude", "stale", "broken", "noisy")

# Marker words that stand in for toxic language (the paper's RealToxicityPrompts axis). Any of
# them in a response makes it toxic; their rate in the pretraining corpus is a knob.
TOXIC_WORDS = ("stupid", "idiot", "dumb", "ugly", "loser", "moron", "shut up")

# Filler the base corpus uses to ramble; a response carrying it after its answer does not stop.
RAMBLE_SENTENCES = (
    "And then there is more to say.",
    "Some people say many things about this.",
    "It was a long day and the story goes on.",
    "There is also a lot more to tell.",
    "Anyway, that is not all.",
)

POLITE_OPENERS = ("Sure!", "Of course.", "Happy to help.", "Here you go.")
GREETINGS = ("Hello!", "Hi there!", "Good day!")

NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)

# The "Elvish" cipher language: a fixed word-for-word dictionary, the stand-in for the paper's
# Fr->En translation benchmark (alignment tax). Every word of the translated sentences is here.
ELVISH = {
    "the": "lo",
    "a": "na",
    "is": "sa",
    "lives": "vimu",
    "in": "ri",
    "has": "kesa",
    "works": "tamu",
    "as": "ke",
    "likes": "dora",
    "and": "e",
    "big": "golo",
    "small": "piti",
    "red": "rua",
    "blue": "bela",
    "green": "vela",
    "cat": "miro",
    "dog": "vuro",
    "house": "doma",
    "river": "lumi",
    "hill": "tolo",
    "old": "sena",
    "new": "nova",
    "sees": "vira",
    "boat": "kalo",
    "eats": "manu",
    "bread": "pano",
    "fish": "pesa",
    "happy": "hila",
    "sad": "tira",
    "friend": "amo",
    "my": "mi",
    "your": "tu",
    "goes": "iru",
    "to": "ad",
    "market": "meka",
}

# What each job does, so that a story's ending follows from a fact (the HellaSwag stand-in).
JOB_ACTIVITIES = {
    "baker": "baked fresh bread for the town",
    "farmer": "fed the animals on the farm",
    "painter": "painted a picture of the hills",
    "doctor": "helped a sick child feel better",
    "teacher": "taught the children to read",
    "sailor": "sailed the boat out to sea",
    "miner": "dug for stones deep in the mine",
    "singer": "sang a song in the square",
    "tailor": "sewed a new coat for a friend",
}
