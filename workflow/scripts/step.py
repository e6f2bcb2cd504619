"""Run one `python -m e2epath <step>` from a Snakemake rule without a shell.

Named inputs, outputs and params become `--name value` arguments (underscores → dashes, lists
expand, True → a bare flag, False/None → left out; an input named `positional` goes last,
bare), so no sample-sheet path is ever pasted into
a shell string and a 10,000-file input list never meets the kernel's argument-length limit.
stdout, stderr and logging go to the rule's log.
"""
import os
import sys
from pathlib import Path

sm = snakemake  # noqa: F821 - injected by Snakemake
os.environ.setdefault("OMP_NUM_THREADS", str(sm.threads))
sys.path.insert(0, str(Path(sm.scriptdir).parent))  # workflow/: the e2epath package


def as_args(named) -> list[str]:
    args: list[str] = []
    for name, value in named.items():
        if value is None or value is False or name in ("step", "positional"):
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


argv = [sm.params.step] + as_args(dict(sm.input.items())) + as_args(dict(sm.output.items()))
argv += as_args(dict(sm.params.items()))
argv += [str(p) for p in sm.input.get("positional", [])]  # aggregates: one file per slide
# Point the process's stdout/stderr (fds 1 and 2: Python, tqdm, C libraries) at the log.
log_fd = os.open(sm.log[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.dup2(log_fd, 1)
os.dup2(log_fd, 2)
print("e2epath", *argv, flush=True)
import logging  # noqa: E402 - so that the device claim below is logged too

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
from e2epath.core.devices import claim_gpu  # noqa: E402 - after sys.path is set

with claim_gpu(int(sm.resources.get("gpu", 0))):
    from e2epath.__main__ import main  # noqa: E402

    code = main(argv)
sys.stdout.flush()
sys.stderr.flush()
sys.exit(code)
