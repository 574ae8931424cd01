"""DeCLIP's EDA (declip.synonym_replacement): the synonyms it draws from, a small table in synonyms.txt beside this
file instead of WordNet, to stay offline and dependency-free (the file says which words it holds)."""
import os

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "synonyms.txt"), encoding="utf-8") as f:
    entries = [line.rstrip("\n").split(": ") for line in f if line.strip() and not line.startswith("#")]
SYNONYMS = {word: synonyms.split(", ") for word, synonyms in entries}
