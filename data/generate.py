"""
Generate a tiny, deterministic, multimodal chat dataset for smoke-testing ft.

It makes data/demo/ with:
  train.jsonl, heldout.jsonl   one {"messages": [...]} chat per line
  images/*.png                 96x96 pictures of one coloured shape
  audio/*.wav                  16 kHz mono PCM_16 clips: a low/high tone or 1-3 beeps

Every answer is short, templated and fully determined by the input, so even a
tiny randomly-initialised model can learn it. Same --seed gives byte-identical files.

Run:
  python data/generate.py [--out data/demo] [--train 240] [--heldout 40] [--seed 0]
"""

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

Rng = np.random.Generator
Row = dict[str, list[dict]]

# -----------------------------------------------------------------------------
# vocabulary

KIND_PROBS = {"text": 0.7, "image": 0.2, "audio": 0.1}  # text rows carry the held-out rule the report scores
TWO_TURN_PROB = 0.1
SYSTEM_PROB = 0.5
SYSTEM_PROMPT = "Answer briefly."

IMG_SIZE = 96
SHAPES = ["circle", "square", "triangle"]
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20)}
BACKGROUNDS = [(255, 255, 255), (245, 245, 240), (240, 244, 250), (250, 246, 236)]

SR = 16000
LOW_HZ, HIGH_HZ, BEEP_HZ = 220.0, 880.0, 660.0
NUMBER_WORDS = {1: "One", 2: "Two", 3: "Three"}

Q_SHAPE = "What shape is in the picture?"
Q_COLOUR = "What colour is the shape?"
Q_DESCRIBE = "Describe the picture."
Q_PITCH = "Is the tone high or low?"
Q_BEEPS = "How many beeps do you hear?"
Q_HEAR = "What do you hear?"

Q_COPY = "Repeat the first word:"
# Words the tiny model's tokenizer (ft/tiny.py) keeps whole after a space, so that copying a word is copying a token.
COPY_WORDS = ["cat", "fox", "red", "green", "blue", "brown", "quick", "lazy", "high", "tone", "step", "shape"]
COPY_LENGTH = 3

# -----------------------------------------------------------------------------
# message helpers

def text(s: str) -> dict:
    return {"type": "text", "text": s}

def msg(role: str, *parts: dict) -> dict:
    return {"role": role, "content": list(parts)}

def pick(rng: Rng, items: list) -> object:
    return items[int(rng.integers(len(items)))]

# -----------------------------------------------------------------------------
# images

def draw_shape(rng: Rng, shape: str, colour: str) -> Image.Image:
    img = Image.new("RGB", (IMG_SIZE, IMG_SIZE), pick(rng, BACKGROUNDS))
    r = int(rng.integers(20, 33))  # half-size of the shape
    cx, cy = (int(v) for v in rng.integers(r + 4, IMG_SIZE - r - 4, size=2))
    fill = COLOURS[colour]
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img

def image_answers(shape: str, colour: str) -> dict[str, str]:
    return {
        Q_SHAPE: f"A {shape}.",
        Q_COLOUR: f"{colour.capitalize()}.",
        Q_DESCRIBE: f"A {colour} {shape}.",
    }

def image_row(rng: Rng, root: Path, name: str, two_turn: bool) -> Row:
    shape, colour = pick(rng, SHAPES), pick(rng, list(COLOURS))
    rel = f"images/{name}.png"
    draw_shape(rng, shape, colour).save(root / rel, format="PNG", optimize=True)
    return media_chat(rng, {"type": "image", "path": rel}, image_answers(shape, colour), two_turn)

# -----------------------------------------------------------------------------
# audio

def tone(freq: float, dur: float) -> np.ndarray:
    t = np.arange(int(SR * dur)) / SR
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    ramp = min(len(x) // 2, int(0.01 * SR))  # 10 ms fade in/out, no clicks
    env = np.ones_like(x)
    env[:ramp] = np.linspace(0, 1, ramp)
    env[len(x) - ramp:] = np.linspace(1, 0, ramp)
    return x * env

def silence(dur: float) -> np.ndarray:
    return np.zeros(int(SR * dur))

def beeps(rng: Rng, n: int) -> np.ndarray:
    beep, gap = float(rng.uniform(0.08, 0.12)), float(rng.uniform(0.08, 0.12))
    parts = [silence(float(rng.uniform(0.03, 0.08)))]
    for i in range(n):
        parts += [tone(BEEP_HZ, beep)] + ([silence(gap)] if i < n - 1 else [])
    x = np.concatenate(parts)
    total = max(float(rng.uniform(0.4, 0.7)), len(x) / SR + 0.05)  # pad tail to 0.4-1.0 s
    return np.concatenate([x, silence(total - len(x) / SR)])

def write_wav(path: Path, x: np.ndarray) -> None:
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)
    sf.write(str(path), pcm, SR, subtype="PCM_16", format="WAV")

def audio_row(rng: Rng, root: Path, name: str, two_turn: bool) -> Row:
    rel = f"audio/{name}.wav"
    if rng.random() < 0.5:
        high = bool(rng.random() < 0.5)
        x = tone(HIGH_HZ if high else LOW_HZ, float(rng.uniform(0.4, 0.8)))
        pitch = "high" if high else "low"
        answers = {Q_PITCH: f"{pitch.capitalize()}.", Q_HEAR: f"A {pitch} tone."}
    else:
        n = int(rng.integers(1, 4))
        x = beeps(rng, n)
        a = f"{NUMBER_WORDS[n]} beep{'s' if n > 1 else ''}."
        answers = {Q_BEEPS: a, Q_HEAR: a}
    write_wav(root / rel, x)
    return media_chat(rng, {"type": "audio", "path": rel}, answers, two_turn)

def media_chat(rng: Rng, media: dict, answers: dict[str, str], two_turn: bool) -> Row:
    qs = [str(q) for q in rng.permutation(list(answers))]
    msgs = [msg("user", media, text(qs[0])), msg("assistant", text(answers[qs[0]]))]
    if two_turn:  # follow-up about the same media, asked in text only
        msgs += [msg("user", text(qs[1])), msg("assistant", text(answers[qs[1]]))]
    return {"messages": msgs}

# -----------------------------------------------------------------------------
# text-only rows: copy the first word of a short list (a rule the tiny model learns within the demo's training;
# copying the whole list needs about three times the steps, the last word is a different token from its place in
# the list)

def copy_task(rng: Rng) -> tuple[str, str, str]:
    """(question, answer, the list)"""
    words = [str(w) for w in rng.choice(COPY_WORDS, size=COPY_LENGTH, replace=False)]
    # The list starts a line, as the answer does, so its first word is the same tokens in both (" cat" is not "cat").
    return f"{Q_COPY}\n{' '.join(words)}", words[0], " ".join(words)

def text_row(rng: Rng, two_turn: bool, seen: set[str]) -> Row:
    """A copying chat whose lists are not in `seen`, which gains them."""
    msgs = [msg("system", text(SYSTEM_PROMPT))] if rng.random() < SYSTEM_PROB else []
    for _ in range(2 if two_turn else 1):
        q, a, words = copy_task(rng)
        while words in seen:  # held-out lists are new inputs, never lists the model trained on
            q, a, words = copy_task(rng)
        seen.add(words)
        msgs += [msg("user", text(q)), msg("assistant", text(a))]
    return {"messages": msgs}

# -----------------------------------------------------------------------------
# splits and atomic output

def make_split(root: Path, split: str, n: int, rng: Rng, seen: set[str]) -> list[Row]:
    """`n` rows of `split`; its word lists avoid `seen`, which gains them."""
    kinds, probs = list(KIND_PROBS), list(KIND_PROBS.values())
    rows = []
    for i in range(1, n + 1):
        kind = kinds[int(rng.choice(len(kinds), p=probs))]
        two_turn = bool(rng.random() < TWO_TURN_PROB)
        name = f"{split}_{i:04d}"
        if kind == "image":
            rows.append(image_row(rng, root, name, two_turn))
        elif kind == "audio":
            rows.append(audio_row(rng, root, name, two_turn))
        else:
            rows.append(text_row(rng, two_turn, seen))
    with open(root / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return rows

def build(out: Path, splits: dict[str, int], seed: int) -> None:
    """Build into a temp sibling folder, then swap it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        (tmp / "images").mkdir()
        (tmp / "audio").mkdir()
        seen: set[str] = set()
        for k, (split, n) in enumerate(splits.items()):
            make_split(tmp, split, n, np.random.default_rng([seed, k]), seen)  # independent draws per split
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo")
    p.add_argument("--train", type=int, default=240)
    p.add_argument("--heldout", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    build(args.out, {"train": args.train, "heldout": args.heldout}, args.seed)
    print(f"wrote {args.train} train + {args.heldout} heldout rows to {args.out} ({dir_size(args.out) / 1e6:.2f} MB)")

if __name__ == "__main__":
    main()
