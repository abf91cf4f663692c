"""KD vs KD + interchange-intervention term on the LM demo, at equal steps.

Both students start from the demo's pruned student and train for --steps steps on
the demo's transfer set (forward KL, T = 1, the demo's lr). Scored on the held-out
modules: bits per byte, KL to the teacher, and interchange-intervention agreement
(IIA): on held-out windows, each row's block-0 output at 4 random positions is
swapped in from another row, in student and teacher alike, and IIA is the share of
affected positions where the student's counterfactual top-1 token equals the
teacher's (the counterfactual KL is given too). The same seeded swaps are used for
every model.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/interchange.py --steps 200 --write
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _lm_seed import Setup, dump, machine, replace_section, table

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = {"layer_map": {0: 0}, "weight": 1.0, "positions": "random", "num_positions": 4, "pairing": "shuffle"}


@torch.no_grad()
def interchange_agreement(student_path: Path, teacher_path: Path, texts: list[str], max_length: int,
                          student_layer: int, teacher_layer: int, batches: int = 24, seed: int = 0) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alambic.evaluate.predict import lm_windows
    from alambic.models.interventions import LayerSwap, affected_positions, choose_positions, choose_sources, gather_positions

    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    student = AutoModelForCausalLM.from_pretrained(student_path).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    windows = [w for w in lm_windows(tokenizer, texts, max_length).inputs if len(w) == max_length]
    generator = torch.Generator().manual_seed(seed)
    swaps = LayerSwap(student.base_model, student_layer), LayerSwap(teacher.base_model, teacher_layer)
    matches = kl_sum = counted = 0.0
    for start in range(0, min(len(windows), batches * 8) - 7, 8):
        ids = torch.tensor(windows[start:start + 8])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        sources = choose_sources(8, "shuffle", generator)
        positions = choose_positions(torch.ones_like(ids, dtype=torch.bool), "random", 4, generator)
        mask = affected_positions(torch.zeros_like(ids), positions)
        logits = []
        for model, swap, layer in ((student, swaps[0], student_layer), (teacher, swaps[1], teacher_layer)):
            states = model.base_model(**inputs, output_hidden_states=True).hidden_states[layer + 1]
            hidden = swap(inputs, positions, gather_positions(states[sources], positions))
            logits.append(model.lm_head(hidden)[:, :-1][mask].float())
        student_logp, teacher_logp = (torch.log_softmax(x, -1) for x in logits)
        matches += float((student_logp.argmax(-1) == teacher_logp.argmax(-1)).sum())
        kl_sum += float((teacher_logp.exp() * (teacher_logp - student_logp)).sum())
        counted += float(mask.sum())
    return {"iia": matches / counted, "cf_kl": kl_sum / counted, "cf_positions": int(counted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-seed")
    parser.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = parser.parse_args()
    started = time.time()
    setup = Setup(Path(args.out), args.steps, args.threads)
    kd, kd_seconds = setup.train("kd_seed0")
    iit, iit_seconds = setup.train("kd_interchange", interchange=SECTION)
    metrics = setup.evaluate({"pruned_init": setup.student_init, "kd": kd, "kd_interchange": iit})
    rows = []
    for name, path, seconds in (("pruned_init", setup.student_init, None), ("kd", kd, kd_seconds),
                                ("kd_interchange", iit, iit_seconds)):
        agreement = interchange_agreement(path, setup.teacher, setup.heldout(), setup.demo.max_length, 0, 0)
        rows.append({"student": name, "bits_per_byte": metrics[name]["bits_per_byte"],
                     "kl_to_teacher": metrics[name]["kl_to_teacher"], "top1_agreement": metrics[name]["top1_agreement"],
                     **agreement, "train_s": seconds})
    teacher_bpb = metrics["teacher"]["bits_per_byte"]
    dump(Path(args.out) / "interchange.json", {"rows": rows, "teacher_bits_per_byte": teacher_bpb})
    text = "\n".join([
        f"## Interchange-intervention distillation, {args.steps} student steps (LM demo)", "",
        f"Command: `OMP_WAIT_POLICY=PASSIVE python benchmarks/interchange.py --steps {args.steps} --write` "
        f"({(time.time() - started) / 60:.0f} min; train_s 0 = a finished run reused).",
        f"Machine: {machine()}.", "",
        f"Teacher (shipped): {teacher_bpb:.4f} bits/byte. Students: the demo's pruned student, {args.steps} steps "
        "each, batch 16 x 128 tokens packed, lr 1e-3, forward KL at T = 1; interchange term: student block 0 <- "
        "teacher block 0, 4 random positions per row, source = another row of the batch, weight 1. IIA = share of "
        "affected held-out positions where the counterfactual top-1 tokens agree (same seeded swaps for every model); "
        "cf_kl = KL(teacher || student) there, per position.", "",
        table(rows, ["student", "bits_per_byte", "kl_to_teacher", "top1_agreement", "iia", "cf_kl", "cf_positions",
                     "train_s"]),
    ])
    print(text)
    if args.write:
        replace_section(RESULTS, f"interchange-{args.steps}", text)


if __name__ == "__main__":
    main()
