"""`alambic generate`: ask the teacher, store every answer durably, then parse, filter and write.

    alambic generate configs/generate_label.yaml
    alambic generate configs/generate_label.yaml --retry-failed

The run folder (output.dir) holds `config.yaml` (as resolved; names of key
variables only), `cache/` (the request cache), `teacher.jsonl|parquet` (one
row per prompt and sample, failures included, with provenance),
`train.jsonl|parquet` (the student's data), `rejected.jsonl`,
`contamination.json` when configured, and `summary.json`.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

from alambic.config import dump_config
from alambic.durable import atomic_write_bytes
from alambic.generate.backends import make_backend
from alambic.generate.backends.base import TeacherRequest
from alambic.generate.backends.openai_backend import read_api_key
from alambic.generate.cache import RequestCache, request_key
from alambic.generate.preflight import preflight
from alambic.generate.config import GenerateConfig
from alambic.generate.filters import Example, ExampleFilter
from alambic.generate.inputs import read_table, require_columns
from alambic.generate.outputs import remove_stale, to_student_format, write_json, write_table
from alambic.generate.recipes import Recipe, Rejection, build_recipe
from alambic.generate.runner import Redactor, RequestRunner
from alambic.generate.selfinstruct import InstructionPool, load_seeds
from alambic.generate.summary import build_summary
from alambic.output_paths import check_output_folder, make_folder, remove_created
from alambic.redact import redact_text, url_secrets


@dataclass
class Job:
    """One (input record, sample) pair and the request that answers it."""

    source_id: object
    record: dict
    request: TeacherRequest


def backend_identity(config: GenerateConfig) -> dict:
    """What the cache fingerprint covers; computed without loading any model."""
    teacher = config.teacher
    if teacher.backend == "openai":
        # Credentials in the URL are not part of the identity and never reach the manifest.
        return {"backend": "openai", "model": teacher.model, "base_url": redact_text(teacher.base_url.rstrip("/")),
                "extra_body": teacher.extra_body}
    return {"backend": teacher.backend, "model": teacher.model, "dtype": teacher.dtype}


class GenerateRun:
    def __init__(self, config: GenerateConfig, retry_failed: bool = False, new_cache: bool = False):
        self.config = config
        self.retry_failed = retry_failed
        self.new_cache = new_cache
        self.run_dir = Path(config.output.dir)
        self.params = config.sampling.request_params()
        self.identity = backend_identity(config)
        self.recipe: Recipe = build_recipe(config)

    def execute(self) -> dict:
        api_key = read_api_key(self.config.teacher.api_key_env)
        records = self._read_input()
        for record in records:  # a template naming a missing column fails here, before any model loads
            self.recipe.teacher_messages(record)
            self.recipe.student_prompt(record)
        example_filter = ExampleFilter(self.config.filters)  # reads evaluation sets: fail before any request
        preflight(self.config)  # e.g. teacher.device=cuda without a GPU: before anything is written
        check_output_folder(self.run_dir, "output.dir")
        backend = make_backend(self.config.teacher, api_key)  # a missing local model fails here, before any write
        created = []
        try:
            created = make_folder(self.run_dir)
            atomic_write_bytes(self.run_dir / "config.yaml", dump_config(self.config).encode())
            cache = RequestCache(self.run_dir / "cache", self.identity, self.params, replace_foreign=self.new_cache)
        except BaseException:
            asyncio.run(backend.aclose())
            raise
        try:
            redact = Redactor(api_key, *url_secrets(self.config.teacher.base_url))
            runner = RequestRunner(backend, cache, self.params, self.config.teacher.retry, redact,
                                   show_progress=self.config.progress)
            self.stats = runner.stats
            records, jobs, pool = asyncio.run(self._collect(backend, runner, records))
            teacher_rows, examples, rejected = self._assemble(jobs, cache)
        except BaseException:
            cache.close()
            if created and not cache.records:  # a folder this run made, and no answer in it: leave nothing
                shutil.rmtree(self.run_dir, ignore_errors=True)
                remove_created(created[:-1])
            raise
        finally:
            cache.close()
        kept, dropped = example_filter.apply(examples)
        files = self._write(teacher_rows, kept, rejected + dropped, example_filter, pool)
        summary = build_summary(self.config, runner.stats, teacher_rows, kept, rejected + dropped,
                                example_filter, len(records), files, pool)
        write_json(self.run_dir / "summary.json", summary)
        return summary

    def _read_input(self) -> list[dict]:
        if self.config.recipe.kind == "self_instruct":
            return []
        source = self.config.input
        records = read_table(source.path, source.format)
        needed = [source.prompt_column] + ([source.id_column] if source.id_column else [])
        require_columns(records, needed + list(source.keep_columns), f"input file {source.path!r}",
                        "input.prompt_column / input.id_column / input.keep_columns")
        return records[: source.limit] if source.limit else records

    async def _collect(self, backend, runner: RequestRunner, records: list[dict]):
        pool = None
        try:
            if self.config.recipe.kind == "self_instruct":
                pool = await self._grow_instructions(runner)
                records = [{"prompt": instruction} for instruction in pool.generated]
            jobs = self._jobs(records, runner.cache)
            await runner.run([job.request for job in jobs], self.retry_failed, label="answers")
        finally:
            await backend.aclose()
        return records, jobs, pool

    async def _grow_instructions(self, runner: RequestRunner) -> InstructionPool:
        recipe = self.config.recipe
        pool = InstructionPool(recipe, load_seeds(recipe))
        for round_index in range(recipe.rounds):
            requests = []
            for proposal in range(recipe.proposals_per_round):
                messages = pool.proposal_messages(round_index, proposal, self.config.prompt.system)
                requests.append(self._request(messages, sample_index=proposal, cache=runner.cache))
            await runner.run(requests, self.retry_failed, label=f"proposals {round_index + 1}/{recipe.rounds}")
            for request in requests:
                stored = runner.cache.records.get(request.key)
                if stored is not None and stored["status"] == "ok":
                    pool.offer(stored["content"], round_index)
        return pool

    def _request(self, messages: list[dict], sample_index: int, cache: RequestCache) -> TeacherRequest:
        seed = self.config.sampling.seed
        return TeacherRequest(key=request_key(cache.fingerprint, messages, sample_index), messages=tuple(messages),
                              sample_index=sample_index, seed=None if seed is None else seed + sample_index)

    def _jobs(self, records: list[dict], cache: RequestCache) -> list[Job]:
        id_column = self.config.input.id_column if self.config.input else None
        jobs = []
        for position, record in enumerate(records):
            messages = self.recipe.teacher_messages(record)
            source_id = record[id_column] if id_column else position
            for sample in range(self.config.sampling.n):
                jobs.append(Job(source_id, record, self._request(messages, sample, cache)))
        return jobs

    def _assemble(self, jobs: list[Job], cache: RequestCache):
        """Teacher rows for every job (exactly one each), parsed examples, and rejections."""
        teacher_rows, examples, rejected = [], [], []
        for job in jobs:
            stored = cache.records.get(job.request.key)
            row = self._teacher_row(job, stored)
            teacher_rows.append(row)
            if row["status"] != "ok":
                rejected.append({"id": job.source_id, "sample_index": job.request.sample_index,
                                 "reason": "teacher_failed", "detail": row["error"], "records": []})
                continue
            parsed = self.recipe.parse(job.record, stored["content"])
            if isinstance(parsed, Rejection):
                rejected.append({"id": job.source_id, "sample_index": job.request.sample_index,
                                 "reason": parsed.reason, "detail": parsed.detail, "content": stored["content"],
                                 "records": []})
                continue
            if self.recipe.keeps_raw_completion and stored.get("logprobs"):
                for record in parsed:
                    record["completion_logprobs"] = stored["logprobs"]
            examples.append(Example(job.source_id, job.request.sample_index, parsed))
        return teacher_rows, examples, rejected

    def _teacher_row(self, job: Job, stored: dict | None) -> dict:
        row = {"id": job.source_id, "sample_index": job.request.sample_index, "key": job.request.key,
               "messages": list(job.request.messages), "teacher": self.identity, "params": self.params,
               "seed": job.request.seed}
        if stored is None:
            return {**row, "status": "failed", "error": {"kind": "not_sent", "message": "no answer stored"}}
        row.update({"status": stored["status"], "time": stored["time"], "attempts": stored["attempts"]})
        if stored["status"] != "ok":
            return {**row, "error": stored["error"]}
        return {**row, "content": stored["content"], "finish_reason": stored["finish_reason"],
                "usage": stored["usage"], "served_model": stored.get("model"), "latency_s": stored.get("latency_s"),
                "completion_logprobs": stored.get("logprobs")}

    def _write(self, teacher_rows, kept: list[Example], rejected: list[dict], example_filter, pool) -> dict:
        output = self.config.output
        files = {}
        for name, rows in (("teacher", teacher_rows),
                           ("train", [to_student_format(r, output.student_format) for e in kept for r in e.records])):
            remove_stale(self.run_dir / name)
            files[name] = str(write_table(self.run_dir / name, rows, output.format))
        files["rejected"] = str(write_table(self.run_dir / "rejected", rejected, "jsonl"))
        if example_filter.contamination is not None:
            files["contamination"] = str(write_json(self.run_dir / "contamination.json",
                                                    example_filter.contamination.report()))
        if pool is not None:
            files["proposals"] = str(write_table(self.run_dir / "proposals", pool.log, "jsonl"))
        return files
