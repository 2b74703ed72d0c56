import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF_DIR = os.path.join(ROOT, "conf")


def readme_section_commands(title: str) -> list:
    """The commands in the ```bash blocks of the README section that starts with `title` (up to
    the next "## " heading), continuation lines joined, comments left out."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split(title, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        lines = block.replace("\\\n", " ").splitlines()
        commands += [" ".join(line.split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return commands


def readme_tool_args(title: str, script: str) -> list:
    """The arguments after `script` of the README section's one `.venv/bin/python <script>` command
    (as the shell splits it: quotes honoured, a trailing comment dropped)."""
    (line,) = [c for c in readme_section_commands(title) if c.startswith(f".venv/bin/python {script}")]
    return shlex.split(line, comments=True)[2:]
