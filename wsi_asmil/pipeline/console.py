"""What a person running the workflow sees: compact progress, then what failed and where the report is.

Snakemake prints every job's inputs and outputs; on the demo that is about 2,800 lines, most of
them the input lists of rules ``all`` and ``report``, and the one line that matters (where the
report is) scrolls away. Two pieces fix that without hiding anything:

* :func:`filter_stream` (``python -m wsi_asmil.pipeline.console``, which ``make demo`` pipes Snakemake's
  output through) keeps the plan, warnings and errors, and turns the job chatter into one progress
  line (rewritten in place on a terminal, every 10 % otherwise). Snakemake's own complete log in
  ``.snakemake/log/`` and each rule's log file keep the full detail.
* :func:`summary_lines` is called by the Snakefile when a run ends, however it is started: the
  slides that could not be used and the jobs that failed, each with its reason (the last error
  line of its log), and as the very last line the path of the report.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

PREFIX = "wsi-asmil:"
#: The summary's last line starts so; the filter holds it back until Snakemake's own closing lines
#: have passed, so it is the last line a user sees.
REPORT_LINE = f"{PREFIX} report:"
_PROGRESS = re.compile(r"^(\d+) of (\d+) steps \((\d+)%\) done")
_CHATTER = re.compile(
    r"^(Select jobs to execute\.\.\.|Execute \d+ jobs\.\.\.|\[\w{3} \w{3} +\d+ [\d:]+ \d{4}\]|Finished jobid: .*"
    r"|DAG of jobs will be updated after completion\.|Updating checkpoint dependencies\.|Updating job .*"
    r"|Removing temporary output .*|Touching output file .*)$"
)
_JOB_HEADER = re.compile(r"^(local)?(rule|checkpoint) \w+:$")
_ERROR_HEADER = re.compile(r"^Error in (group|rule) (\w+):$")
_ERROR_WORDS = re.compile(r"(Error|Exception|error:|failed|Killed)", re.IGNORECASE)


@dataclass(frozen=True)
class FailedJob:
    """A job Snakemake reported as failed: its rule, its log file and the reason found in that log."""

    rule: str
    log: str | None
    reason: str

    @property
    def slide(self) -> str | None:
        """Per-slide rules log to ``.../<slide>.log``; the file name is the slide."""
        return Path(self.log).stem if self.log else None


def reason_from_log(path: str | Path | None) -> str:
    """The last line of a rule's log that reads like an error (else its last line)."""
    if path is None or not Path(path).is_file():
        return "no log file"
    lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    if not lines:
        return "the log is empty"
    errors = [ln for ln in lines if _ERROR_WORDS.search(ln)]
    return (errors or lines)[-1]


def failed_jobs(snakemake_log: str | Path) -> list[FailedJob]:
    """Every ``Error in rule`` block of a Snakemake log, with the reason from the rule's own log.

    Rule logs are named relative to the working directory, which holds ``.snakemake/log/``.
    """
    workdir = Path(snakemake_log).resolve().parents[2]
    jobs: list[FailedJob] = []
    rule: str | None = None
    log: str | None = None

    def close() -> None:
        if rule is not None:
            jobs.append(FailedJob(rule, log, reason_from_log(workdir / log if log else None)))

    for line in Path(snakemake_log).read_text(errors="replace").splitlines():
        header = _ERROR_HEADER.match(line)
        if header:
            close()
            rule, log = header.group(2), None
        elif rule is not None and line.startswith("    log: "):
            log = line[len("    log: "):].split(" (check log file")[0].strip()
        elif rule is not None and not line.startswith(" "):
            close()
            rule = None
    close()
    return jobs


def unusable_slides(inventories: Iterable[str | Path]) -> list[tuple[str, str]]:
    """(slide, reason) of every slide an inventory could not use."""
    out = []
    for path in inventories:
        if Path(path).is_file():
            with open(path, newline="") as fh:
                out += [(r["slide_id"], r["message"]) for r in csv.DictReader(fh) if r["status"] != "ok"]
    return out


def summary_lines(report: str | Path, inventories: Sequence[str | Path], snakemake_logs: Sequence[str | Path],
                  success: bool) -> list[str]:
    """The end-of-run summary; the last line always says where the report is (or why there is none)."""
    lines = []
    skipped = unusable_slides(inventories)
    if skipped:
        lines.append(f"{PREFIX} {len(skipped)} slide(s) could not be used (listed in the inventory):")
        lines += [f"  {sid}: {why}" for sid, why in skipped]
    failed = [job for log in snakemake_logs if Path(log).is_file() for job in failed_jobs(log)]
    if failed:
        lines.append(f"{PREFIX} {len(failed)} job(s) failed; the other slides went on:")
        lines += [f"  {job.rule}" + (f" {job.slide}" if job.slide else "") + f": {job.reason}"
                  + (f" (log: {job.log})" if job.log else "") for job in failed]
    if Path(report).is_file():
        state = "" if success else " (from the slides that finished; see the errors above)"
        lines.append(f"{REPORT_LINE} {report}{state}")
    else:
        lines.append(f"{REPORT_LINE} none yet ({report}): fix the errors above and run again; finished work is kept")
    return lines


def filter_stream(lines: Iterable[str], out: TextIO, tty: bool) -> None:
    """Copy Snakemake's output to ``out`` without the per-job chatter.

    Job blocks (``rule x:`` and its indented lines) and scheduler lines are dropped; progress
    becomes one line; everything else (plan, warnings, errors, the summary) passes unchanged.
    """
    in_job = False
    in_banner = False
    held: list[str] = []
    shown = -10
    planned = 0
    progress_open = False

    def emit(text: str) -> None:
        nonlocal progress_open
        if progress_open:
            out.write("\n")
            progress_open = False
        out.write(text + "\n")

    for raw in lines:
        line = raw.rstrip("\n")
        if in_job:
            if line.startswith("    "):
                continue
            in_job = False
        if _JOB_HEADER.match(line):
            in_job = True
            continue
        if line == "SNAKEMAKE":
            in_banner = True
        if in_banner:
            in_banner = line.startswith("  ") or line in ("SNAKEMAKE", "=========")
            if in_banner:
                continue
        if line.startswith(REPORT_LINE):
            held.append(line)
            continue
        if _CHATTER.match(line) or not line.strip():
            continue
        step = _PROGRESS.match(line)
        if step:
            done, total, pct = (int(g) for g in step.groups())
            if total != planned:  # a checkpoint re-planned the run: the percentages start again
                planned, shown = total, -10
            if tty:
                out.write(f"\rprogress: {done}/{total} jobs ({pct}%)")
                progress_open = True
            elif pct >= shown + 10 or done == total:
                shown = pct
                emit(f"progress: {done}/{total} jobs ({pct}%)")
            out.flush()
            continue
        emit(line)
        out.flush()
    for line in held:
        emit(line)
    if progress_open:
        out.write("\n")
    out.flush()


def main(argv: Sequence[str] | None = None) -> None:
    argparse.ArgumentParser(
        prog="python -m wsi_asmil.pipeline.console",
        description="Filter Snakemake's output (stdin) to compact progress; full logs stay in .snakemake/log/.",
    ).parse_args(argv)
    filter_stream(sys.stdin, sys.stdout, sys.stdout.isatty())


if __name__ == "__main__":
    main()
