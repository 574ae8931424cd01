"""DeCLIP's EDA (declip.synonym_replacement): the synonyms it draws from."""

# EDA draws synonyms from WordNet. To stay offline and dependency-free we use this small built-in table instead: the
# words of the synthetic captions of plumbing/synthetic.py (colours, shapes, sizes, positions, counts, backgrounds,
# "picture of"...) and common photo-caption (COCO-style) words. A word without an entry is never replaced; stopwords
# have no entry, so, as in EDA, they are never replaced either. Multi-word synonyms are allowed, as WordNet's are.
SYNONYMS = {
    # colours
    "red": ["crimson", "scarlet"], "green": ["emerald", "lime"], "blue": ["azure", "navy"],
    "yellow": ["golden", "lemon"], "purple": ["violet", "lilac"], "orange": ["amber", "tangerine"],
    "black": ["dark", "ebony"], "white": ["pale", "snowy"], "gray": ["grey", "silver"], "grey": ["gray", "silver"],
    "brown": ["tan", "chocolate"], "pink": ["rose", "salmon"],
    # shapes
    "circle": ["disc", "ring", "round"], "circles": ["discs", "rings"], "square": ["box", "quadrate"],
    "squares": ["boxes", "quadrates"], "triangle": ["trigon", "wedge"], "triangles": ["trigons", "wedges"],
    "star": ["pentagram", "asterisk"], "stars": ["pentagrams", "asterisks"], "cross": ["plus sign", "crucifix"],
    "crosses": ["plus signs", "crucifixes"], "hexagon": ["six-sided figure", "hexagonal shape"],
    "hexagons": ["six-sided figures", "hexagonal shapes"], "shape": ["form", "figure"], "shapes": ["forms", "figures"],
    "object": ["thing", "item"], "objects": ["things", "items"],
    # sizes
    "small": ["little", "tiny"], "large": ["big", "huge"], "big": ["large", "huge"], "little": ["small", "tiny"],
    # positions
    "center": ["centre", "middle"], "centre": ["center", "middle"], "middle": ["center", "centre"],
    "left": ["left side", "left hand"], "right": ["right side", "right hand"], "top": ["upper side", "summit"],
    "bottom": ["underside", "base"],
    # counts
    "one": ["1", "single"], "two": ["2", "pair of"], "three": ["3", "trio of"],
    # backgrounds
    "background": ["backdrop", "setting"], "striped": ["stripy", "banded"], "checkered": ["checked", "chequered"],
    "dotted": ["spotted", "speckled"],
    # what the caption is about
    "picture": ["image", "photo"], "image": ["picture", "photo"], "photo": ["photograph", "picture"],
    "photograph": ["photo", "picture"], "drawing": ["sketch", "illustration"],
    # common photo-caption words
    "man": ["guy", "gentleman"], "woman": ["lady", "female"], "person": ["individual", "human"],
    "people": ["persons", "folks"], "boy": ["lad", "kid"], "girl": ["lass", "kid"], "child": ["kid", "youngster"],
    "children": ["kids", "youngsters"], "dog": ["puppy", "hound"], "cat": ["kitten", "kitty"],
    "car": ["automobile", "vehicle"], "street": ["road", "avenue"], "road": ["street", "roadway"],
    "plate": ["dish", "platter"], "food": ["meal", "dish"], "sitting": ["seated", "perched"],
    "standing": ["upright", "erect"], "walking": ["strolling", "walk"], "holding": ["carrying", "gripping"],
    "looking": ["staring", "gazing"], "eating": ["consuming", "feeding"], "playing": ["frolicking", "sporting"],
    "riding": ["mounting", "driving"], "group": ["bunch", "cluster"], "several": ["some", "various"],
    "young": ["youthful", "junior"], "old": ["aged", "elderly"], "room": ["chamber", "space"],
    "building": ["structure", "edifice"], "field": ["meadow", "grassland"], "grass": ["lawn", "turf"],
    "sign": ["signboard", "placard"], "beach": ["shore", "seashore"], "ocean": ["sea", "seas"],
    "sky": ["heavens", "air"], "table": ["desk", "board"], "bowl": ["dish", "basin"],
}
