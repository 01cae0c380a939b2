"""The README's Python quick-start runs as written, and its two commands are the Makefile's targets."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quickstart_block_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README.md has no ```python block"
    script = tmp_path / "quickstart.py"
    script.write_text(blocks[0])
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Dice per class" in proc.stdout


def test_two_setup_commands_are_makefile_targets():
    section = README.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(make \w+)", re.search(r"```bash\n(.*?)```", section, re.S)[1], re.M)
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for cmd in commands:
        assert re.search(rf"^{cmd.split()[1]}:", makefile, re.M), cmd
    assert "make test" in (ROOT / ".ci" / "run").read_text()
