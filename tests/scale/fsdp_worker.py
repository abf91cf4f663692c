"""Run under `torchrun`: train from a config with train.strategy=fsdp and report what each process held.

Writes, per rank, `rank<r>.json` with the bytes of the parameters this process
really held (its local shards) for the student and the teacher, next to the
full sizes; rank 0 also writes `trained.safetensors`, the gathered trained student.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from alambic.config import load_config
from alambic.training import distributed
from alambic.training.loop import run_distillation


def main(config_path: str, report_dir: str) -> None:  # argv[3] == --resume: continue with a changed config
    report = {}
    original = distributed.FSDPStrategy.prepare

    def prepare(self, setup, make_optimizer):
        full_student = distributed.local_parameter_bytes(setup.student)
        full_teacher = distributed.local_parameter_bytes(setup.teacher_model) if setup.teacher_model is not None else 0
        student, optimizer = original(self, setup, make_optimizer)
        teacher = getattr(setup.teacher, "model", None)
        report.update(
            rank=self.rank, world_size=self.world_size,
            student_full=full_student, student_local=distributed.local_parameter_bytes(student),
            teacher_full=full_teacher,
            teacher_local=distributed.local_parameter_bytes(teacher) if teacher is not None else 0,
            embedding_local_rows=int(student.model.get_input_embeddings().weight.to_local().shape[0]),
            head_local_rows=int(student.model.get_output_embeddings().weight.to_local().shape[0]),
        )
        return student, optimizer

    distributed.FSDPStrategy.prepare = prepare
    result = run_distillation(load_config(config_path, ["train.strategy=fsdp"]), resume="--resume" in sys.argv)
    Path(report_dir, f"rank{report['rank']}.json").write_text(json.dumps(report))
    if not dist.is_initialized():  # the strategy closed its group: gather needs one more
        dist.init_process_group("gloo")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(result.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if report["rank"] == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in full.items()}, str(Path(report_dir, "trained.safetensors")))
    # Leave together and close the group: a gloo group still open at interpreter exit can abort a rank
    # ("terminate called without an active exception") after all its work is done.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
