#!/usr/bin/env python
"""Rebuild the debug tokenizer in lance_ds/assets/debug_tokenizer/ (deterministic: same output on every run).

    python tools/build_debug_tokenizer.py [--output DIR] [--check]

A byte-level BPE with Qwen2's pre-tokenizer (the same regex split and byte-level mapping, so it tokenises like Qwen2.5
on a smaller vocabulary): 2026 learned tokens, then Qwen2.5's 22 special tokens in Qwen's order (ids 2026..2047),
2048 in all. The training corpus is built below: plain English, every default system prompt, and the example
world's captions, questions, answers and edit instructions (colours, shapes, sizes, positions, directions).
--check rebuilds into a temporary directory and fails if the committed files differ.
"""

from __future__ import annotations

import argparse
import filecmp
import itertools
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lance_ds.config.core import output_problem  # noqa: E402
from lance_ds.data.sequence import DEFAULT_SYSTEM_PROMPTS  # noqa: E402
from lance_ds.data.tokenizer import DEBUG_TOKENIZER_DIR, QWEN_SPECIAL_TOKENS  # noqa: E402

VOCAB_SIZE = 2048  # including the special tokens
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2.5): contractions, letters, single digits, punctuation runs,
# newlines, whitespace.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "grey",
           "cyan", "magenta", "teal", "navy", "violet", "gold", "silver", "beige"]
SHAPES = ["circle", "square", "triangle", "rectangle", "star", "cross", "diamond", "hexagon", "ellipse", "ring",
          "cube", "sphere", "disk", "dot", "line", "bar", "heart", "pentagon", "oval", "arrow"]
SIZES = ["small", "large", "big", "tiny", "medium", "huge", "thin", "wide", "tall", "short"]
PLACES = ["in the center", "in the middle", "at the top", "at the bottom", "on the left", "on the right",
          "in the top left corner", "in the top right corner", "in the bottom left corner",
          "in the bottom right corner", "near the edge", "next to the border"]
DIRECTIONS = ["left", "right", "up", "down", "upward", "downward", "to the left", "to the right",
              "diagonally", "clockwise", "counterclockwise", "towards the center", "away from the center"]
MOTIONS = ["moves", "slides", "drifts", "bounces", "rolls", "travels", "glides", "spins", "rotates", "grows",
           "shrinks", "flashes", "fades", "jumps", "falls", "rises"]
BACKGROUNDS = ["on a white background", "on a black background", "on a gray background", "on a plain background",
               "against a dark backdrop", "on a light blue background"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "a", "an", "single"]

ENGLISH = """
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words, and a video is a sequence of
pictures shown one after another. This is a small model trained on simple synthetic data so that tests run quickly.
What is in the image? There is a shape in the picture. How many objects are there? Which way does it move?
Where is the object? What colour is it? Describe the scene in one sentence. The answer is short and accurate.
Please change the colour of the object, keep everything else the same, and return the edited image.
Make it bigger. Make it smaller. Turn it into another shape. Replace the background. Remove the object.
Add a second object next to the first one. Move the object to the other side. Flip the image horizontally.
Rotate the picture by ninety degrees. Reverse the video so that the motion goes the other way.
Slow the video down. Speed it up. The camera is still and the object moves across the frame from one side to
the other. At the start of the clip it is near the edge; by the end it has reached the opposite side.
I think that we should go there today, but they said it would be better to wait until tomorrow morning.
She has been working on this for a long time, and he will help her when he can. It was not what we expected.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 24 32 48 64 100 128 256 512 1000 2024. Time: 1.5 seconds, 12 frames per second.
Questions and answers, instructions and responses, captions and descriptions: all of them are text.
"Yes," she said. "No, it's not." Isn't it? Don't, won't, can't, I'm, you're, we've, they'll, he'd.
Punctuation: commas, periods. Colons: semicolons; dashes - and (parentheses) [brackets] {braces} / slashes!
""".strip()


# Common English words, so plain text outside the example world tokenises sensibly.
COMMON_WORDS = """
about above across act action activity actually add address admit adult affect after again against age
agency agent ago agree agreement ahead air all allow almost alone along already also although always
among amount analysis and animal another answer any anyone anything appear apply approach area argue arm
around arrive art article artist as ask assume at attack attention attorney audience author authority
available avoid away baby back bad bag ball bank bar base be beat beautiful because become bed before
begin behavior behind believe benefit best better between beyond bill billion bit blood board body book
born both box boy break bring brother budget build building business but buy by call camera campaign can
cancer candidate capital car card care career carry case catch cause cell center central century certain
certainly chair challenge chance change character charge check child choice choose church citizen city
civil claim class clear clearly close coach cold collection college color come commercial common
community company compare computer concern condition conference congress consider consumer contain
continue control cost could country couple course court cover create crime cultural culture cup current
customer cut dark data daughter day dead deal death debate decade decide decision deep defense degree
democrat democratic describe design despite detail determine develop development die difference different
difficult dinner direction director discover discuss discussion disease do doctor dog door down draw
dream drive drop drug during each early east easy eat economic economy edge education effect effort eight
either election else employee end energy enjoy enough enter entire environment environmental especially
establish even evening event ever every everybody everyone everything evidence exactly example executive
exist expect experience expert explain eye face fact factor fail fall family far fast father fear federal
feel feeling few field fight figure fill film final finally financial find fine finger finish fire firm
first fish five floor fly focus follow food foot for force foreign forget form former forward four free
friend from front full fund future game garden gas general generation get girl give glass go goal good
government great ground group grow growth guess gun guy hair half hand hang happen happy hard have he
head health hear heart heat heavy help her here herself high him himself his history hit hold home hope
hospital hot hotel hour house how however huge human hundred husband idea identify if image imagine
impact important improve in include including increase indeed indicate individual industry information
inside instead institution interest interesting international interview into investment involve issue it
item its itself job join just keep key kid kill kind kitchen know knowledge land language large last late
later laugh law lawyer lay lead leader learn least leave left leg legal less let letter level lie life
light like likely line list listen little live local long look lose loss lot love low machine magazine
main maintain major majority make man manage management manager many market marriage material matter may
maybe me mean measure media medical meet meeting member memory mention message method middle might
military million mind minute miss mission model modern moment money month more morning most mother mouth
move movement movie mrs much music must my myself name nation national natural nature near nearly
necessary need network never new news newspaper next nice night no none nor north not note nothing notice
now number occur of off offer office officer official often oh oil ok old on once one only onto open
operation opportunity option or order organization other others our out outside over own owner page pain
painting paper parent part participant particular particularly partner party pass past patient pattern
pay peace people per perform performance perhaps period person personal phone physical pick picture piece
place plan plant play player point police policy political politics poor popular population position
positive possible power practice prepare present president pressure pretty prevent price private probably
problem process produce product production professional professor program project property protect prove
provide public pull purpose push put quality question quickly quite race radio raise range rate rather
reach read ready real reality realize really reason receive recent recently recognize record reduce
reflect region relate relationship religious remain remember remove report represent republican require
research resource respond response responsibility rest result return reveal rich right rise risk road
rock role room rule run safe same save say scene school science scientist score sea season seat second
section security see seek seem sell send senior sense series serious serve service set seven several
sexual shake share she shoot short shot should shoulder show side sign significant similar simple simply
since sing single sister sit site situation six size skill skin small smile so social society soldier
some somebody someone something sometimes son song soon sort sound source south southern space speak
special specific speech spend sport spring staff stage stand standard start state statement station stay
step still stock stop store story strategy street strong structure student study stuff style subject
success successful such suddenly suffer suggest summer support sure surface system table take talk task
tax teach teacher team technology television tell ten tend term test than thank that the their them
themselves then theory there these they thing think third this those though thought thousand threat three
through throughout throw thus time to today together tonight too top total tough toward town trade
traditional training travel treat treatment tree trial trip trouble true truth try turn two type under
understand unit until up upon us use usually value various very victim view violence visit voice vote
wait walk wall want war watch water way we weapon wear week weight well west western what whatever when
where whether which while white who whole whom whose why wife will win wind window wish with within
without woman wonder word work worker world worry would write writer wrong yard yeah year yes yet you
young your yourself zero river mountain forest ocean island village valley bridge castle desert cloud
rain snow storm sun moon planet sky bird horse cow sheep rabbit mouse lion tiger bear wolf fox duck
chicken apple banana orange bread cheese coffee tea milk sugar salt butter egg rice soup cake kitchen
spoon fork knife plate bottle chair sofa lamp clock mirror pillow blanket shirt shoe hat coat dress
pocket button ribbon pencil eraser notebook ruler scissors bicycle train plane boat truck engine wheel
road path corner square street market
""".split()


def example_world_corpus() -> list[str]:
    """Captions, questions, answers and edit instructions in the example dataset's style."""
    lines = []
    for colour, shape, size in itertools.product(COLOURS, SHAPES, SIZES):
        lines.append(f"a {size} {colour} {shape}")
    for (colour, shape), place, bg in itertools.product(itertools.product(COLOURS, SHAPES), PLACES[:4], BACKGROUNDS[:2]):
        lines.append(f"A {colour} {shape} {place} {bg}.")
    for (colour, shape), motion, direction in itertools.product(
            itertools.product(COLOURS[:10], SHAPES[:10]), MOTIONS, DIRECTIONS[:6]):
        lines.append(f"a {colour} {shape} {motion} {direction}")
    for (c1, c2), shape in itertools.product(itertools.permutations(COLOURS[:12], 2), SHAPES[:8]):
        lines.append(f"make the {shape} {c2}")
        lines.append(f"change the color of the {c1} {shape} to {c2}")
        lines.append(f"turn the {c1} {shape} {c2}")
    for (s1, s2), colour in itertools.product(itertools.permutations(SHAPES[:10], 2), COLOURS[:6]):
        lines.append(f"replace the {colour} {s1} with a {colour} {s2}")
        lines.append(f"turn the {s1} into a {s2}")
    for colour, shape, n in itertools.product(COLOURS[:8], SHAPES[:8], NUMBERS):
        lines.append(f"What shape is in the image? {n} {colour} {shape}.")
        lines.append(f"What colour is the {shape}? It is {colour}.")
    for shape, direction in itertools.product(SHAPES[:10], DIRECTIONS):
        lines.append(f"Which direction does the {shape} move? It moves {direction}.")
        lines.append(f"reverse the video so the {shape} moves {direction}")
    # the templates of lance_ds/data/example.py, written out here so that the tokenizer does not change with it
    for colour, shape, direction in itertools.product(COLOURS[:12], SHAPES[:12], DIRECTIONS[:4]):
        lines += [f"a {colour} {shape} moving {direction}", f"make it {colour}", f"turn it into a {shape}"]
    lines += ["You are a helpful assistant.", "What is in the image?", "What colour is the shape?", "What shape is it?",
              "What happens in the video?", "Which way does the shape move?"] * 100
    return lines


def build_corpus() -> list[str]:
    words = [" ".join(COMMON_WORDS[i:i + 12]) for i in range(0, len(COMMON_WORDS), 12)]
    capitalised = [w.capitalize() for w in COMMON_WORDS]
    sentences = [" ".join(capitalised[i:i + 8]) + "." for i in range(0, len(capitalised), 8)]
    chat_roles = ["system\n", "user\n", "assistant\n"] * 100  # the chat template's role lines
    return ([ENGLISH] * 20 + words * 3 + sentences * 2 + list(DEFAULT_SYSTEM_PROMPTS.values()) * 50 + chat_roles
            + example_world_corpus())


def build(output: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(QWEN_SPECIAL_TOKENS), min_frequency=2,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE, tok.get_vocab_size(with_added_tokens=True)
    output.mkdir(parents=True, exist_ok=True)
    tok.save(str(output / "tokenizer.json"), pretty=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "built_by": "tools/build_debug_tokenizer.py",
    }
    (output / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEBUG_TOKENIZER_DIR)
    parser.add_argument("--check", action="store_true", help="fail if the committed tokenizer differs from a rebuild")
    args = parser.parse_args(argv)
    if problem := output_problem("--output", args.output, directory=True):  # a file where the directory goes: before building
        print(f"build_debug_tokenizer: {problem}", file=sys.stderr)
        return 2
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp))
            names = ["tokenizer.json", "tokenizer_config.json"]
            _, mismatch, errors = filecmp.cmpfiles(Path(tmp), args.output, names, shallow=False)
            if mismatch or errors:
                print(f"{args.output}: {mismatch + errors} differ from a rebuild; run tools/build_debug_tokenizer.py")
                return 1
        print(f"{args.output}: up to date")
        return 0
    build(args.output)
    print(f"wrote {args.output} ({VOCAB_SIZE} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
