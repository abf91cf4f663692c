"""Quantization-aware distillation on the LM demo: fp32 KD vs its post-training int4 vs int4 QAT + KD.

All students start from the demo's pruned student and train for --steps steps (forward
KL, T = 1). The fp32 KD student is quantized after training (PTQ: the same int4
scheme, the same export) and compared with a student distilled under int4 fake
quantization (QAT). Each quantized model is the compressed-tensors folder loaded
back with from_pretrained. Scored on the held-out modules: bits per byte, KL to the
teacher; size of the safetensors on disk; CPU generation tokens/s (batch 1 and 8).
Target: QAT recovers >= half of the bits per byte that PTQ loses.

The demo student's MLP width (344) is divisible by 8 but not by 16 or 32, so the
group-wise scheme uses groups of 8; `--group-size 0` uses one scale per output row.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/qat.py --steps 200 --group-size 0 --write
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _lm_seed import Setup, dump, machine, replace_section, table

RESULTS = Path(__file__).with_name("RESULTS.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--group-size", type=int, default=0, help="0: one scale per output row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-seed")
    parser.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = parser.parse_args()
    from alambic.models.qat import export_compressed, folder_bytes
    from alambic.models import load_model
    from alambic.config import ModelConfig

    started = time.time()
    group = args.group_size or None
    scheme = f"int{args.bits}-" + (f"g{group}" if group else "row")
    setup = Setup(Path(args.out), args.steps, args.threads)
    kd, kd_seconds = setup.train("kd_seed0")
    qat, qat_seconds = setup.train(f"kd_qat_{scheme}", quantization={"bits": args.bits, "group_size": group})
    from alambic.models import load_tokenizer

    fp32_config = ModelConfig(model=str(kd))
    ptq = export_compressed(load_model(fp32_config, "causal_lm", role="student"), Path(args.out) / f"kd_ptq_{scheme}",
                            args.bits, group, tokenizer=load_tokenizer(fp32_config, role="student"))
    qat_export = qat.parent / "quantized"
    models = {"kd_fp32": kd, f"kd_ptq_{scheme}": ptq, f"kd_qat_{scheme}": qat_export}
    metrics = setup.evaluate(models, speed=True)
    seconds = {"kd_fp32": kd_seconds, f"kd_qat_{scheme}": qat_seconds}
    rows = [{"student": name, "bits_per_byte": metrics[name]["bits_per_byte"],
             "kl_to_teacher": metrics[name]["kl_to_teacher"], "safetensors_MB": folder_bytes(path) / 2**20,
             "tokens_per_s_b1": metrics[name].get("tokens_per_s_batch1"),
             "tokens_per_s_b8": metrics[name].get("tokens_per_s_batch8"), "train_s": seconds.get(name)}
            for name, path in models.items()]
    fp32, ptq_bpb, qat_bpb = (row["bits_per_byte"] for row in rows)
    lost = ptq_bpb - fp32
    recovered = (ptq_bpb - qat_bpb) / lost if lost > 0 else None
    dump(Path(args.out) / f"qat_{scheme}.json", {"rows": rows, "recovered": recovered})
    verdict = ("n/a (PTQ lost nothing)" if recovered is None else
               f"{recovered:.0%} of the {lost:.4f} bits/byte lost by PTQ ({'met' if recovered >= 0.5 else 'not met'})")
    text = "\n".join([
        f"## Quantization-aware distillation, {scheme}, {args.steps} student steps (LM demo)", "",
        f"Command: `OMP_WAIT_POLICY=PASSIVE python benchmarks/qat.py --steps {args.steps} --bits {args.bits} "
        f"--group-size {args.group_size} --write` ({(time.time() - started) / 60:.0f} min; train_s 0 = a finished "
        "run reused).", f"Machine: {machine()}.", "",
        f"Teacher: {metrics['teacher']['bits_per_byte']:.4f} bits/byte. Students: the demo's pruned student, "
        f"{args.steps} steps each, forward KL at T = 1. Quantized: weight-only int{args.bits}, symmetric, "
        + (f"groups of {group}" if group else "one scale per output row") + ", all linear layers of the blocks "
        "(the embedding, tied to the head, stays fp32), written as compressed-tensors pack-quantized and loaded "
        "back with from_pretrained. transformers decompresses these weights to dense fp32 when it loads them, so "
        "CPU tokens/s do not change with quantization here (int4 kernels are vLLM's, on GPU); disk size does.", "",
        table(rows, ["student", "bits_per_byte", "kl_to_teacher", "safetensors_MB", "tokens_per_s_b1",
                     "tokens_per_s_b8", "train_s"]), "",
        f"- QAT + KD recovers {verdict} (target >= 50%).",
    ])
    print(text)
    if args.write:
        replace_section(RESULTS, f"qat-{scheme}-{args.steps}", text)


if __name__ == "__main__":
    main()
