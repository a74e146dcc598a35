"""What a user sees: compact progress, failures with their reasons, and the report as the last line."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from wsi_asmil.pipeline.console import REPORT_LINE, failed_jobs, filter_stream, summary_lines

FAILING_WORKFLOW = '''
import sys
from wsi_asmil.pipeline.console import summary_lines

rule all:
    input: expand("out/{s}.txt", s=["good", "bad one"])

rule stage:
    output: "out/{s}.txt"
    log: "logs/stage/{s}.log"
    shell:
        "if [ '{wildcards.s}' = 'bad one' ]; then echo 'loading model' > {log:q};"
        " echo \\"ValueError: slide 'bad one': no tiles\\" >> {log:q}; echo done >> {log:q}; exit 1; fi;"
        " touch {output:q}"

onerror:
    print("\\n".join(summary_lines("out/report.html", [], log, False)), file=sys.stderr)
'''


def test_a_failed_job_is_named_with_the_reason_from_its_log(tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(FAILING_WORKFLOW)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--keep-going"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and (tmp_path / "out" / "good.txt").is_file()
    log = next((tmp_path / ".snakemake" / "log").glob("*.log"))
    [job] = failed_jobs(log)
    assert (job.rule, job.slide) == ("stage", "bad one")
    assert job.reason == "ValueError: slide 'bad one': no tiles"  # the error line, not the last line
    lines = proc.stderr.strip().splitlines()
    summary = lines[lines.index(next(ln for ln in lines if "job(s) failed" in ln)):]
    assert any("stage bad one: ValueError: slide 'bad one': no tiles" in ln for ln in summary)
    assert any(ln.startswith(REPORT_LINE) and "none yet" in ln for ln in summary)

    out = io.StringIO()
    filter_stream(io.StringIO(proc.stderr), out, tty=False)
    shown = out.getvalue().splitlines()
    assert shown[-1].startswith(REPORT_LINE)
    assert any(ln.startswith("Error in rule stage") for ln in shown)
    assert not any(ln.startswith(("localrule", "rule ", "    reason:", "Select jobs")) for ln in shown)


SNAKEMAKE_OUTPUT = """Building DAG of jobs...
Job stats:
job      count
-----  -------
x          100
total      100

""" + "".join(
    f"""Select jobs to execute...
Execute 1 jobs...

[Thu Dec  3 04:42:40 2026]
rule x:
    input: {' '.join(f'in/{j}.txt' for j in range(50))}
    output: out/{i}.txt
    jobid: {i}
    wildcards: s={i}
[Thu Dec  3 04:42:41 2026]
Finished jobid: {i} (Rule: x)
{i + 1} of 100 steps ({i + 1}%) done
""" for i in range(100)
) + "wsi-asmil: report: out/report/index.html\nComplete log(s): .snakemake/log/x.log\nElapsed time: 0:00:01\n"


def test_job_chatter_becomes_a_few_progress_lines() -> None:
    out = io.StringIO()
    filter_stream(io.StringIO(SNAKEMAKE_OUTPUT), out, tty=False)
    lines = out.getvalue().splitlines()
    progress = [ln for ln in lines if ln.startswith("progress:")]
    assert progress[0] == "progress: 1/100 jobs (1%)" and progress[-1] == "progress: 100/100 jobs (100%)"
    assert len(progress) == 11
    replanned = io.StringIO()
    filter_stream(io.StringIO("1 of 3 steps (33%) done\n3 of 30 steps (10%) done\n9 of 30 steps (30%) done\n"),
                  replanned, tty=False)
    assert replanned.getvalue().splitlines() == ["progress: 1/3 jobs (33%)", "progress: 3/30 jobs (10%)",
                                                 "progress: 9/30 jobs (30%)"]
    assert "Job stats:" in lines and not any("in/3.txt" in ln for ln in lines)
    assert lines[-1] == "wsi-asmil: report: out/report/index.html"
    assert len(lines) < 30 < len(SNAKEMAKE_OUTPUT.splitlines()) / 10

    tty = io.StringIO()
    filter_stream(io.StringIO(SNAKEMAKE_OUTPUT), tty, tty=True)
    assert tty.getvalue().count("\rprogress:") == 100 and tty.getvalue().count("\n") < 30


def test_summary_lists_unusable_slides_and_points_to_the_report(tmp_path: Path) -> None:
    inventory = tmp_path / "slides.csv"
    inventory.write_text("slide_id,path,status,message\na,a.svs,ok,\nb,b.svs,error,slide 'b': file is empty\n")
    report = tmp_path / "index.html"
    report.write_text("<html></html>")
    lines = summary_lines(report, [inventory, tmp_path / "absent.csv"], [], True)
    assert lines[1] == "  b: slide 'b': file is empty" and "1 slide(s)" in lines[0]
    assert lines[-1] == f"{REPORT_LINE} {report}"
