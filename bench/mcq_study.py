"""Study: why the pocket model's multiple choice is at chance, and the answer format that fixes it.

A fresh LM of the pocket model's size (its config, random weights) learns text-only multiple
choice about a described person: "<x> is {key value description}." then "What is <x>'s
{trait}?\nA. v1\nB. v2 ...\nAnswer with the option's letter from the given choices directly."
The answer is the letter alone (`--answer letter`, what the pocket curriculum teaches) or the
value, then its letter (`--answer value-letter`: "red b"), the same lesson as the recognition
answers that compare before their verdict. A copy warm-up (lvlm.copy_warmup_loss) runs first.
Accuracy: the letter the model writes (greedy) on held-out identities (300 questions of 2-4
options; a blind guess scores about 0.36). Prints one JSON line per evaluation.

Measured (2 CPU cores, one thread each, side by side; 400 copy steps, batch 32, lr 2e-3):

    python bench/mcq_study.py --answer letter --steps 1200 --copy-steps 400 --eval-every 200
        step 200 / 600 / 1200: 0.39 / 0.32 / 0.42   (the letter alone: chance throughout)
    python bench/mcq_study.py --answer value-letter --steps 1200 --copy-steps 400 --eval-every 200
        step 200 / 600 / 1200: 0.40 / 0.55 / 0.75   (value first: learnt, still rising)

So the pocket base model now answers multiple choice with the value and then the letter
(`LvlmTrainConfig.mcq_answer="value_letter"`), and `eval` reads the letter where it stands
(`eval.mcq: generate` in recipes/pocket.yaml): its text MCQ went from 0.46 to 1.00 on fresh
held-out photos with the description in words (card.json). Each run takes about 6 minutes.
"""
import argparse, json, math, random, time, torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration
from plvmctl.answers import mcq_prompt
from plvmctl.lab import toy, lvlm
p = argparse.ArgumentParser(description="Multiple choice on a fresh pocket-size LM: the letter alone vs the value then the letter.")
p.add_argument("--answer", default="letter"); p.add_argument("--steps", type=int, default=600)
p.add_argument("--copy-steps", type=int, default=300); p.add_argument("--batch", type=int, default=32)
p.add_argument("--lr", type=float, default=2e-3); p.add_argument("--seed", type=int, default=0)
p.add_argument("--eval-every", type=int, default=100)
a = p.parse_args(); torch.set_num_threads(1); torch.manual_seed(a.seed)
D = "plvmctl/assets/pocket/backbone"
tok = AutoTokenizer.from_pretrained(D)
model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(D)); model.train()
lm, head = model.model.language_model, model.lm_head
QUESTIONS = {"hair_colour": "What is <x>'s hair color?", "skin": "What is <x>'s skin tone?",
             "hair_style": "What is <x>'s hairstyle?"}
def row(identity, rng):
    trait = rng.choice(list(QUESTIONS)); correct = getattr(identity, trait)
    values = list(toy.TRAITS[trait]); others = rng.sample([v for v in values if v != correct], rng.randint(1, 3))
    options = others + [correct]; rng.shuffle(options)
    letters = "ABCD"[:len(options)]; letter = letters[options.index(correct)]
    question = mcq_prompt(QUESTIONS[trait], list(zip(letters, options)))
    answer = letter if a.answer == "letter" else f"{correct} {letter}"
    return lvlm.Row("text", question, answer, None, {"x": lvlm.describe(identity, "keyvalue")}, tuple(letters)), letter
def batch(pool, rng, n):
    rows, letters = zip(*[row(rng.choice(pool), rng) for _ in range(n)])
    return lvlm.encode_rows(rows, tok, 9), letters
def loss_of(b):
    out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
    return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]).float(), b.labels[:, 1:].reshape(-1), ignore_index=-100)
LETTER = {l: tok(" " + l, add_special_tokens=False)["input_ids"][-1] for l in "ABCD"}
@torch.no_grad()
def evaluate(n=300):
    model.eval(); rng = random.Random(99); hit = 0
    rows_letters = [row(rng.choice(toy.heldout_identities()), rng) for _ in range(n)]
    rows = [r for r, _ in rows_letters]
    b = lvlm.encode_rows(rows, tok, 9, with_answers=False)
    ids, mask = b.input_ids, b.attention_mask
    steps = 1 if a.answer == "letter" else 2
    for _ in range(steps):  # greedy, left-to-right on each row's own end
        out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        ends = mask.sum(1) - 1
        nxt = out[torch.arange(len(rows)), ends].argmax(-1)
        ids = torch.cat([ids, torch.zeros(len(rows), 1, dtype=ids.dtype)], 1)
        mask = torch.cat([mask, torch.zeros(len(rows), 1, dtype=mask.dtype)], 1)
        ids[torch.arange(len(rows)), ends + 1] = nxt; mask[torch.arange(len(rows)), ends + 1] = 1
    last = ids[torch.arange(len(rows)), mask.sum(1) - 1]
    hit = sum(int(last[i]) == LETTER[letter] for i, (_, letter) in enumerate(rows_letters))
    model.train(); return hit / n
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
crng = random.Random(a.seed); t0 = time.time()
for step in range(a.copy_steps):
    for g in opt.param_groups: g["lr"] = a.lr * min(1, (step + 1) / 30)
    l = lvlm.copy_warmup_step(model, opt, crng)
print(json.dumps({"copy_steps": a.copy_steps, "copy_loss": round(l, 3), "s": round(time.time() - t0)}), flush=True)
rng = random.Random(a.seed); train = toy.training_identities()
for step in range(a.steps):
    for g in opt.param_groups: g["lr"] = a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
    b, _ = batch(train, rng, a.batch); loss = loss_of(b)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if (step + 1) % a.eval_every == 0:
        print(json.dumps({"step": step + 1, "loss": round(float(loss.detach()), 3), "heldout": evaluate(),
                          "s": round(time.time() - t0)}), flush=True)
